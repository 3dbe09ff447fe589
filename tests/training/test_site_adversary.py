"""The site-adversarial objective (training.losses.SiteAdversarialLoss, preset
joint-sites-adversarial-zoom-lite0): gradient reversal, the class-conditioned site classifier, its
schedule, and that it trains on two sites and is absent on one (synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from synthetic_busi import write_busi_folder
from synthetic_sites import write_busbra_folder
from torch import nn

from shared.labels import CLASS_NAMES
from training import joint, sites
from training.__main__ import main as training_main
from training.data import load_split_images
from training.losses import FeatureTap, JointLoss, SiteAdversarialLoss, reverse_gradient

PRESET = "joint-sites-adversarial-zoom-lite0"


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("adversary")
    return [
        write_busi_folder(base / "busi", per_class=6),
        write_busbra_folder(base / "bus-bra-copy", patients=12),
    ]


class _Encoder(nn.Module):
    """Two feature maps, like timm's features_only encoders (the deepest last)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.feature_info = SimpleNamespace(channels=lambda: [1, 4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.conv(x)
        return [x, y]


def test_reversal_is_the_identity_forward_and_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 5, requires_grad=True)
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * torch.arange(5.0).expand(3, 5))


def test_the_tap_takes_training_forwards_only() -> None:
    encoder = _Encoder()
    tap = FeatureTap(encoder)
    x = torch.randn(2, 1, 8, 8)
    encoder.eval()
    encoder(x)
    assert tap.features is None  # scoring: nothing taken
    encoder.train()
    with torch.no_grad():
        encoder(x)
    assert tap.features is None
    out = encoder(x)
    assert torch.equal(tap.pop(), out[-1].mean(dim=(2, 3)))
    with pytest.raises(RuntimeError, match="no training forward"):
        tap.pop()  # a loss without its forward is a bug, not a zero term
    tap.remove()
    encoder(x)
    assert tap.features is None


def test_the_encoder_gets_the_site_gradient_reversed_and_the_adversary_learns() -> None:
    torch.manual_seed(0)
    encoder = _Encoder()
    tap = FeatureTap(encoder)
    base = JointLoss(None, 0.0, 1.0)
    loss_fn = SiteAdversarialLoss(base, tap, num_sites=2, weight=0.5)
    assert loss_fn.strength() == 0.5  # no schedule: full strength
    x = torch.randn(6, 1, 8, 8)
    labels = torch.tensor([0, 1, 2, 1, 2, 1])
    sites_ = torch.tensor([0, 0, 0, 1, 1, 1])
    masks = torch.zeros(6, 1, 8, 8)
    outputs = (torch.zeros(6, 3, requires_grad=True), torch.zeros(6, 1, 8, 8, requires_grad=True))

    encoder(x)  # the training forward the tap takes
    loss = loss_fn(outputs, (labels, masks, sites_))
    loss.backward()
    reversed_grad = encoder.conv.weight.grad.clone()
    # The same site loss without reversal, through the same adversary.
    encoder.zero_grad()
    features = encoder(x)[-1].mean(dim=(2, 3))
    tap.pop()
    onehot = F.one_hot(labels, len(CLASS_NAMES)).float()
    plain = F.cross_entropy(loss_fn.adversary(torch.cat([features, onehot], dim=1)), sites_)
    plain.backward()
    expected = loss_fn.strength() * encoder.conv.weight.grad
    assert torch.allclose(reversed_grad, -expected, atol=1e-6)
    # The total is the joint loss plus the adversary's own cross-entropy.
    assert torch.isclose(loss, base(outputs, (labels, masks)) + plain.detach(), atol=1e-6)


def test_the_reversal_ramps_from_nothing_to_its_weight_with_the_schedule() -> None:
    loss_fn = SiteAdversarialLoss(JointLoss(None, 0.0, 1.0), FeatureTap(_Encoder()), 2, 0.5)
    # The per-batch schedule (checkpointed with the run) counts the steps.
    optimizer = torch.optim.SGD(loss_fn.adversary.parameters(), lr=0.1)
    loss_fn.schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=100)
    loss_fn.total_steps = 100
    strengths = []
    for step in range(101):
        if step in (0, 10, 50, 100):
            strengths.append(loss_fn.strength())
        if step < 100:
            optimizer.step()
            loss_fn.schedule.step()
    assert strengths[0] == 0.0
    assert strengths == sorted(strengths) and len(set(strengths)) == 4
    assert 0.49 < strengths[-1] <= 0.5
    loss_fn.total_steps = 50  # past the end of the ramp: it stays at its top
    assert loss_fn.strength() == strengths[-1]
    with pytest.raises(ValueError, match="two sites"):
        SiteAdversarialLoss(JointLoss(None, 0.0, 1.0), FeatureTap(_Encoder()), 1, 0.5)


def test_images_carry_their_site_only_where_the_adversary_has_two_sites(two_sites) -> None:
    samples = sites.scan_sites(two_sites)
    preset = joint.get_preset(PRESET)
    both = load_split_images(samples[:4] + samples[-4:])
    dataset = joint.JointDataset(both, joint.preprocessing_for(preset), preset, seed=0)
    assert dataset.site_index == {"bus-bra": 0, "busi": 1}
    _, target = dataset[0]
    assert len(target) == 3
    assert int(target[2]) == dataset.site_index[both.samples[0].site]
    one = load_split_images([s for s in samples if s.site == "busi"][:4])
    dataset = joint.JointDataset(one, joint.preprocessing_for(preset), preset, seed=0)
    assert len(dataset[0][1]) == 2  # one site: no adversary, the recipe's own targets
    plain = joint.get_preset("joint-sites-zoom-lite0")
    assert joint.adversary_sites(samples, plain) == []


def _run(two_sites: list[Path], tmp_path: Path, preset: str, holdout: str) -> Path:
    out = tmp_path / f"{preset}-{holdout.replace(':', '-')}"
    argv = ["sites", "--data-path", *map(str, two_sites), "--holdout", holdout, "--preset", preset]
    argv += ["--smoke", "--no-pretrained", "--threads", "1", "--no-progress"]
    argv += ["--split-file", str(tmp_path / "folds.json"), "--output-dir", str(out)]
    assert training_main(argv) == 0
    return out


@pytest.mark.slow
def test_the_adversarial_recipe_trains_on_two_sites_and_is_the_plain_one_on_one(
    two_sites, tmp_path
) -> None:
    out = _run(two_sites, tmp_path, PRESET, "fold:0")
    result = json.loads((out / "result.json").read_text())
    assert result["recipe"]["site_adversarial"] == 0.5
    assert set(result["figures"]) == {"busi", "bus-bra"}
    # Trained on one site, the adversary is absent: the weights are the plain recipe's, bit for
    # bit, so its held-out-site runs are joint-sites-zoom-lite0's.
    adversarial = _run(two_sites, tmp_path, PRESET, "site:bus-bra")
    plain = _run(two_sites, tmp_path, "joint-sites-zoom-lite0", "site:bus-bra")
    a = torch.load(adversarial / "weights.pt", weights_only=True)
    b = torch.load(plain / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
