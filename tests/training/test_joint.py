"""The joint task and the cross-validation driver on a tiny synthetic BUSI-layout folder."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_busi import write_busi_folder

from service.registry import load_model
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.models.joint import ENCODERS, JointFlipAverage, JointUNet, load_lite_imagenet_state_dict
from shared.store import list_versions, verify_artifact
from training import joint
from training.__main__ import main as training_main
from training.augment import augment_geometry
from training.data import fold_split, make_folds
from training.metrics import group_bootstrap


def test_folds_keep_every_group_in_one_fold_and_balance_the_classes():
    rng = np.random.default_rng(0)
    labels = [int(v) for v in rng.integers(0, 3, size=200)]
    groups = [i // 3 if i < 60 else i for i in range(200)]  # 20 groups of three near-copies
    keys = [f"k{i}" for i in range(200)]
    folds = make_folds(keys, labels, groups, k=5)["items"]
    fold_of_group: dict[int, set[int]] = {}
    for key, group in zip(keys, groups, strict=True):
        fold_of_group.setdefault(group, set()).add(folds[key]["fold"])
    assert all(len(f) == 1 for f in fold_of_group.values())
    sizes = Counter(item["fold"] for item in folds.values())
    assert set(sizes) == set(range(5)) and max(sizes.values()) - min(sizes.values()) <= 4


def test_group_bootstrap_resamples_groups_not_images():
    rows = [
        {"label": 1, "probs": [0.1, 0.8, 0.1], "dice": d, "mask_pixels": 5, "group": 0}
        for d in (0.2, 0.9, 0.5, 0.7)
    ]
    # one group: every resample is the same set of images, so the interval is the point
    ci = group_bootstrap(rows, n_resamples=50)
    assert ci["lesion_dice"][0] == pytest.approx(0.575) == ci["lesion_dice"][1]
    # the same images as four groups: the interval opens up
    spread = group_bootstrap([{**r, "group": i} for i, r in enumerate(rows)], 200)
    assert spread["lesion_dice"][1] - spread["lesion_dice"][0] > 0.2


def test_joint_model_outputs_and_flip_average_shapes():
    model = JointUNet(freeze_stem_stages=1).eval()
    x = torch.randn(2, 3, 64, 64)
    classes, masks = model(x)
    assert classes.shape == (2, len(CLASS_NAMES)) and masks.shape == (2, 1, 64, 64)
    flipped_classes, flipped_masks = JointFlipAverage(model)(torch.flip(x, dims=[-1]))
    direct_classes, direct_masks = JointFlipAverage(model)(x)
    # flip averaging is mirror-invariant for the class and mirror-equivariant for the mask
    torch.testing.assert_close(flipped_classes, direct_classes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        flipped_masks, torch.flip(direct_masks, dims=[-1]), rtol=1e-4, atol=1e-5
    )
    frozen = [p.requires_grad for p in model.encoder.conv_stem.parameters()]
    assert frozen and not any(frozen)


def test_a_standardising_network_ignores_gain_and_offset_and_keeps_its_weights():
    torch.manual_seed(0)
    model = JointUNet(image_standardise=True).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        classes, masks = model(x)
        brighter = model(x * 2.5 + 0.7)  # one scanner's gain and offset
        scripted = torch.jit.script(model)(x)
        blank = model(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(brighter[0], classes, rtol=0, atol=1e-3)
    torch.testing.assert_close(brighter[1], masks, rtol=0, atol=1e-3)
    torch.testing.assert_close(scripted[0], classes)  # what a published model.pt computes
    assert all(torch.isfinite(t).all() for t in blank)
    plain = JointUNet().eval()
    plain.load_state_dict(model.state_dict())  # no weights of its own: one state dict for both
    with torch.inference_mode():
        assert not torch.allclose(plain(x)[0], classes, atol=1e-3)
    preset = joint.get_preset("joint-sites-zoom-std-lite0")
    assert joint.build_model(preset, pretrained=False).image_standardise


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ENCODERS)
def test_imagenet_weights_of_every_encoder_load_strictly(encoder):
    model = JointUNet(encoder, pretrained=True)
    reference = load_lite_imagenet_state_dict(encoder)
    stem = model.encoder.conv_stem.weight
    assert torch.equal(stem, reference["conv_stem.weight"])


def test_geometry_augmentation_keeps_image_and_mask_aligned():
    import random

    image = np.zeros((60, 80), dtype=np.uint8)
    image[20:40, 30:50] = 180
    mask = np.where(image > 0, 255, 0).astype(np.uint8)
    preset = joint.replace(joint.get_preset("joint-smoke"), aspect_p=1.0, margin_p=1.0)
    for seed in range(5):
        out_image, out_mask = augment_geometry(image, mask, preset, random.Random(seed))
        assert out_image.shape == out_mask.shape
        bright = out_image == 180
        assert (bright <= (out_mask > 0)).all()  # no lesion pixel outside the mask
        assert (out_mask > 0).sum() > 0


@pytest.mark.slow
def test_cv_then_fit_publish_a_diagnosis_artifact_the_service_loads(tmp_path: Path):
    data = write_busi_folder(tmp_path / "busi", per_class=6)
    cv_dir, fit_dir, registry = tmp_path / "cv", tmp_path / "fit", tmp_path / "models"
    common = ["--preset", "joint-smoke", "--data-path", str(data), "--no-pretrained",
              "--threads", "1"]  # fmt: skip
    folds_file = tmp_path / "folds.json"
    argv = ["cv", *common, "--folds-file", str(folds_file), "--output-dir", str(cv_dir),
            "--resamples", "20"]  # fmt: skip
    assert training_main(argv) == 0

    folds = json.loads(folds_file.read_text())
    assert folds["k"] == 5 and len(folds["items"]) == 18
    report = json.loads((cv_dir / "report.json").read_text())
    oof = json.loads((cv_dir / "oof.json").read_text())
    assert set(oof) == set(joint.CANVASES)
    keys = [row["key"] for row in oof["plain"]]
    assert sorted(keys) == sorted(folds["items"])  # every image scored exactly once
    for row in oof["plain"]:
        assert row["fold"] == folds["items"][row["key"]]["fold"]  # by the model that left it out
    assert report["k"] == 5 and len(report["per_fold"]) == 5
    plain = report["pooled"]["plain"]
    assert 0.0 <= plain["accuracy"] <= 1.0 and plain["n"] == 18
    assert plain["ci95"]["accuracy"][0] <= plain["accuracy"] <= plain["ci95"]["accuracy"][1]
    assert "near-duplicate group" in (cv_dir / "report.md").read_text()
    argv = ["oof", *common, "--folds-file", str(folds_file), "--output-dir", str(cv_dir)]
    assert training_main(argv) == 0
    rescored = json.loads((cv_dir / "oof_logits.json").read_text())["rows"]
    by_key = {row["key"]: row for row in oof["plain"]}
    for row in rescored:  # the saved fold weights reproduce the CV run's own scores
        assert np.allclose(row["logits"], by_key[row["key"]]["logits"], atol=1e-3)
        assert len(row["features"]) == 320

    argv = ["fit", *common, "--output-dir", str(fit_dir), "--model-dir", str(registry),
            "--cv-report", str(cv_dir / "report.json"), "--version", "j-1"]  # fmt: skip
    assert training_main(argv) == 0
    assert list_versions(registry, TASK_DIAGNOSIS) == ["j-1"]
    fit_metrics = json.loads((fit_dir / "metrics.json").read_text())
    assert fit_metrics["task"] == TASK_DIAGNOSIS and fit_metrics["artifact"]["version"] == "j-1"
    assert fit_metrics["cross_validation"]["k"] == 5
    assert "Pooled out-of-fold figures" in (fit_dir / "report.md").read_text()
    info = verify_artifact(registry, TASK_DIAGNOSIS, "j-1")
    assert info.metadata["metrics"]["cross_validation"]["plain"]["n"] == 18
    assert info.metadata["preprocessing"]["resize_mode"] == "letterbox"
    loaded = load_model(info)
    assert loaded.output_type == "joint" and loaded.class_names == CLASS_NAMES
    assert loaded.mask_shape == (1, 64, 64)
    assert not loaded.calibration.calibrated

    # the same weights published again with a calibration: no training, same forward
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"calibrated": True, "temperature": 1.5}))
    argv = ["fit", *common, "--output-dir", str(fit_dir), "--model-dir", str(registry),
            "--weights", str(fit_dir / "best.pt"), "--calibration", str(calibration),
            "--version", "j-2"]  # fmt: skip
    assert training_main(argv) == 0
    again = load_model(verify_artifact(registry, TASK_DIAGNOSIS, "j-2"))
    assert again.info.metadata["output"]["classes"]["temperature"] == 1.5
    assert again.calibration.calibrated and again.calibration.temperature == 1.5
    # republished weights carry the history of the run that trained them (its metrics.json)
    assert again.info.metadata["training"]["history"] == info.metadata["training"]["history"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), loaded.module(x))


def test_fold_split_tests_on_exactly_one_fold_and_keeps_groups_whole():
    rng = np.random.default_rng(1)
    labels = [int(v) for v in rng.integers(0, 3, size=120)]
    keys = [f"{CLASS_NAMES[label]}/img{i}.png" for i, label in enumerate(labels)]
    groups = [i // 2 for i in range(120)]  # pairs of near-copies
    folds = make_folds(keys, labels, groups, k=5)
    split = fold_split(folds, fold=2)["items"]
    test = {k for k, v in split.items() if v["split"] == "test"}
    assert test == {k for k, v in folds["items"].items() if v["fold"] == 2}
    split_of_group: dict[int, set[str]] = {}
    for key, group in zip(keys, groups, strict=True):
        split_of_group.setdefault(group, set()).add(split[key]["split"])
    assert all(len(s) == 1 for s in split_of_group.values())
    assert 0.1 < sum(v["split"] == "val" for v in split.values()) / (120 - len(test)) < 0.2


def test_fit_weights_of_the_job_before_the_engine_still_load(tmp_path: Path):
    """`fit --weights .../final.pt` (the shipped model's republish command) keeps working."""
    preset = joint.get_preset("joint-smoke")
    trained = joint.build_model(preset, pretrained=False)
    history = {"epochs": [{"epoch": 1, "train_loss": 2.5, "lr": 1e-3, "seconds": 3.0}]}
    path = tmp_path / "final.pt"
    torch.save({"model": trained.state_dict(), "history": history, "seconds": 3.0}, path)
    model = joint.build_model(preset, pretrained=False)
    loaded_history, seconds = joint.load_weights(path, model)
    assert loaded_history.to_dict() == history and seconds == 3.0
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
