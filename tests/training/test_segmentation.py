"""The segmentation job end to end on a tiny synthetic BUSI-layout folder (no real data needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_busi import write_busi_folder

from shared.labels import TASK_SEGMENTATION
from shared.preprocessing import Preprocessing
from shared.store import list_versions, verify_artifact
from training import segmentation
from training.augment import augment_pair
from training.losses import DiceBCELoss
from training.metrics import bootstrap_mean_ci, score_masks, threshold_sweep
from training.segmentation import get_preset


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [["unet-effnet-lite0-gated", "--flip-tta"], ["unet-effnet-lite0"], ["seed-attention-unet"]],
    ids=lambda p: p[0],
)
def test_smoke_run_writes_report_and_publishes_a_verified_artifact(
    tmp_path: Path, preset: list[str]
) -> None:
    data = write_busi_folder(tmp_path / "busi")
    out, registry = tmp_path / "run", tmp_path / "models"
    base = [
        "--preset", *preset,
        "--data-path", str(data),
        "--split-file", str(tmp_path / "no-split.json"),
        "--output-dir", str(out),
        "--smoke", "--no-progress", "--threads", "1", "--bootstrap", "50",
    ]  # fmt: skip
    argv = [*base, "--model-dir", str(registry), "--version", "smoke-1"]
    assert segmentation.main(argv) == 0

    for name in ("metrics.json", "report.md", "loss_curves.png", "iou_vs_threshold.png",
                 "sample_predictions.png", "checkpoint.pt", "best.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    assert (tmp_path / "no-split.json").is_file()  # made where the flag pointed, reusable
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n_lesion_images"] > 0
    assert 0.0 <= metrics["threshold"] <= 1.0
    assert metrics["artifact"]["version"] == "smoke-1"
    assert metrics["inference"]["chosen"] in metrics["inference"]["variants_on_selection_split"]

    assert list_versions(registry, TASK_SEGMENTATION) == ["smoke-1"]
    info = verify_artifact(registry, TASK_SEGMENTATION, "smoke-1")
    assert info.metadata["output"]["type"] == "logits"
    assert info.metadata["output"]["threshold"] == metrics["threshold"]
    pre = Preprocessing.from_metadata(info.metadata["preprocessing"])
    assert pre.resize_mode == "stretch" and pre.crop is None
    model = torch.jit.load(str(info.model_path))
    side = pre.output_size
    assert model(torch.zeros(1, pre.channels, side, side)).shape == (1, 1, side, side)

    # --resume continues from the checkpoint (no epochs left) and --test-only reuses best weights
    again = [*base, "--resume", str(out / "checkpoint.pt")]
    assert segmentation.main(again) == 0
    assert json.loads((out / "metrics.json").read_text())["training"]["epochs_run"] == 1


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="seed-attention-unet, unet-effnet-lite0, unet-effnet-lite0-gated$"
    ):
        get_preset("unet-resnet")


def test_augmentation_moves_image_and_mask_together() -> None:
    import random

    image = np.zeros((80, 100), dtype=np.uint8)
    image[20:40, 30:60] = 200
    mask = np.where(image > 0, 255, 0).astype(np.uint8)
    rng = random.Random(3)
    for _ in range(10):
        aug_image, aug_mask = augment_pair(image, mask, rng)
        assert aug_image.shape == image.shape and aug_mask.dtype == np.uint8
        assert set(np.unique(aug_mask)) <= {0, 255}
        bright = aug_image > 100
        # the lesion stays where the mask says (edges of the bilinear image aside)
        assert (bright & (aug_mask > 0)).sum() >= 0.8 * bright.sum()


def test_dice_bce_loss_is_small_for_a_confident_correct_prediction() -> None:
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = DiceBCELoss()((target * 2 - 1) * 10, target)
    bad = DiceBCELoss()(-(target * 2 - 1) * 10, target)
    assert good < 0.05 < 1.0 < bad
    empty = DiceBCELoss()(torch.full((1, 1, 8, 8), -10.0), torch.zeros(1, 1, 8, 8))
    assert empty < 0.05  # a normal scan predicted empty costs almost nothing


def test_scores_are_made_at_the_image_size_like_the_service() -> None:
    truth = np.zeros((40, 60), dtype=np.uint8)
    truth[10:30, 15:45] = 255
    prob = np.zeros((8, 8), dtype=np.float32)
    prob[2:6, 2:6] = 1.0  # the same box at model size
    normal = np.zeros((30, 30), dtype=np.uint8)
    s = score_masks([prob, prob * 0], [truth, normal], threshold=0.5)
    assert s["dice"][0] > 0.8 and s["dice"][1] == 1.0
    assert s["any_lesion"].tolist() == [True, False]
    sweep = threshold_sweep([prob, prob], [truth, normal], thresholds=(0.5,))
    assert sweep[0]["normal_with_lesion"] == 1.0


def test_bootstrap_interval_brackets_the_mean() -> None:
    values = np.linspace(0.5, 1.0, 50)
    low, high = bootstrap_mean_ci(values, n_resamples=500)
    assert low < values.mean() < high


def test_command_line_rejects_an_unknown_preset_listing_the_valid_ones(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        segmentation.main(["--preset", "nope", "--data-path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "unet-effnet-lite0" in capsys.readouterr().err


def test_the_default_preset_is_the_shipped_segmenters_recipe() -> None:
    args = segmentation.get_args_parser().parse_args(["--data-path", "d"])
    assert args.preset == "unet-effnet-lite0-gated"
