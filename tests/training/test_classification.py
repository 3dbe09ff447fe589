"""The classification job end to end on a tiny synthetic BUSI-layout folder (no real data needed),
its presets, augmentation and data set; plus checks of the committed split on the real folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_busi import write_busi_folder

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION
from shared.preprocessing import Preprocessing
from shared.store import list_versions, verify_artifact
from training import classification
from training.augment import Augmentation
from training.classification import ClassificationDataset, get_preset
from training.losses import class_weights

REPO = Path(__file__).resolve().parents[2]
BUSI = Path(os.environ.get("BUSI_DATA", REPO.parent / "shared" / "data" / "busi"))


@pytest.mark.slow
def test_smoke_run_reports_exports_and_publishes_a_verified_artifact(tmp_path):
    data = write_busi_folder(tmp_path / "busi")
    out, registry = tmp_path / "run", tmp_path / "models"
    base = [
        "--preset",
        "effnet-lite0",
        "--data-path",
        str(data),
        "--split-file",
        str(tmp_path / "split.json"),
        "--output-dir",
        str(out),
        "--smoke",
        "--no-progress",
        "--threads",
        "1",
        "--bootstrap",
        "50",
    ]
    document = classification.main(
        classification.parse_args([*base, "--model-dir", str(registry), "--version", "smoke-1"])
    )

    for name in (
        "metrics.json",
        "report.md",
        "loss_curves.png",
        "confusion_test.png",
        "roc_test.png",
        "samples_test.png",
        "checkpoint.pt",
        "best.pt",
    ):
        assert (out / name).is_file(), name
    assert (tmp_path / "split.json").is_file()  # made on the fly, reusable
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("validation", "test"):
        m = metrics[split]
        assert {
            "accuracy",
            "macro_f1",
            "macro_auc",
            "per_class",
            "confusion_matrix",
            "ci95",
        } <= set(m)
        assert sum(map(sum, m["confusion_matrix"])) == m["n"]
        assert set(m["per_class"]) == set(CLASS_NAMES)
    assert metrics["training"]["smoke"] is True and metrics["training"]["epochs_run"] == 1
    assert "Smoke run" in (out / "report.md").read_text()

    assert list_versions(registry, TASK_CLASSIFICATION) == ["smoke-1"]
    info = verify_artifact(registry, TASK_CLASSIFICATION, "smoke-1")
    assert info.metadata["class_names"] == list(CLASS_NAMES)
    assert info.metadata["architecture"] == "efficientnet_lite0"
    assert info.metadata["data_fingerprint"]["n_images"] == sum(metrics["split_sizes"].values())
    assert "not a medical device" in info.metadata["intended_use"]
    assert document["artifact"]["sha256"] == info.sha256
    assert info.metadata["training"]["history"] == metrics["history"]
    pre = Preprocessing.from_metadata(info.metadata["preprocessing"])
    scripted = torch.jit.load(str(info.model_path))
    image = np.asarray(Image.open(data / "benign" / "benign (1).png"))
    assert scripted(torch.from_numpy(pre(image))[None]).shape == (1, 3)

    # --resume continues from the checkpoint for one more epoch; history keeps both
    classification.main(
        classification.parse_args([*base, "--epochs", "2", "--resume", str(out / "checkpoint.pt")])
    )
    again = json.loads((out / "metrics.json").read_text())
    assert [row["epoch"] for row in again["history"]["epochs"]] == [1, 2]
    assert again["artifact"] is None  # no --model-dir: nothing published
    assert Path(again["torchscript"]).is_file()


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="seed-resnet18.*effnet-lite0|effnet-lite0.*seed-resnet18"):
        get_preset("resnet1000")


def test_seed_preset_is_the_seed_recipe():
    seed = get_preset("seed-resnet18")
    assert (seed.architecture, seed.resize, seed.crop) == ("resnet18", 256, 224)
    assert (seed.optimizer, seed.lr, seed.momentum, seed.nesterov, seed.weight_decay) == (
        "sgd",
        1e-3,
        0.9,
        True,
        1e-5,
    )
    assert (seed.scheduler, seed.step_size, seed.gamma) == ("step", 10, 0.1)
    assert seed.label_smoothing == 0 and not seed.class_weighted


def test_augmentation_moves_image_and_mask_together_and_keeps_uint8():
    torch.manual_seed(0)
    image = np.zeros((64, 64), dtype=np.uint8)
    image[10:30, 5:25] = 200
    mask = np.where(image > 0, 255, 0).astype(np.uint8)
    aug = Augmentation("strong", 64)
    for _ in range(5):
        out_image, out_mask = aug(image, mask)
        assert out_image.dtype == np.uint8 and out_image.shape == (64, 64)
        bright, lesion = out_image > 100, out_mask > 127
        # the geometry moved both alike (brightness jitter only changes values)
        assert (bright & lesion).sum() >= 0.8 * max(lesion.sum(), 1)


def test_evaluation_data_go_through_the_preprocessing_unchanged():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (70, 90), dtype=np.uint8) for _ in range(2)]
    pre = Preprocessing(resize=64, crop=56)
    ds = ClassificationDataset(images, [0, 2], pre)
    x, y = ds[1]
    np.testing.assert_array_equal(x.numpy(), pre(images[1]))
    assert y == 2


def test_mask_channel_is_a_binary_fourth_channel():
    image = np.full((64, 64), 80, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:32] = 255
    ds = ClassificationDataset([image], [1], Preprocessing(resize=32), masks=[mask])
    x, _ = ds[0]
    assert x.shape == (4, 32, 32)
    assert set(np.unique(x[3].numpy())) == {0.0, 1.0}
    assert x[3, :15].min() == 1.0 and x[3, 17:].max() == 0.0


def test_class_weights_favour_the_rare_class():
    w = class_weights([0, 1, 1, 1, 2, 2], 3, mean_one=True)
    assert w[0] > w[2] > w[1]
    assert float(w.mean()) == pytest.approx(1.0)


@pytest.mark.busi
@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data folder not found at {BUSI}")
def test_committed_split_matches_the_data_and_keeps_groups_whole():
    from training.data import load_split, scan_dataset

    split_file = REPO / "training" / "splits" / "busi.json"
    samples = scan_dataset(BUSI)
    by_split = load_split(split_file, samples)  # raises if file and folder disagree
    assert sum(map(len, by_split.values())) == 623
    items = json.loads(split_file.read_text())["items"]
    group_splits: dict[int, set[str]] = {}
    for item in items.values():
        group_splits.setdefault(item["group"], set()).add(item["split"])
    assert all(len(s) == 1 for s in group_splits.values())


def test_predicted_masks_come_from_the_segmentation_artifact_at_image_size(tiny_model_dir):
    # the tiny segmenter calls every pixel brighter than about 143 a lesion
    image = np.full((50, 70), 40, dtype=np.uint8)
    image[10:30, 20:50] = 230
    (mask,) = classification.predict_masks(tiny_model_dir, [image])
    assert mask.shape == image.shape and mask.dtype == np.uint8
    assert mask[15:25, 25:45].min() == 255 and mask[40:, :].max() == 0
