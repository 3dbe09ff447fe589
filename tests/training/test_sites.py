"""Several sites in one data layer, the site-stratified folds, the holdout driver and the site
augmentation, on synthetic folders (no real data needed)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from synthetic_busi import write_busi_folder
from synthetic_sites import write_busbra_folder

from shared.labels import CLASS_NAMES
from training import augment, joint, sites
from training.__main__ import main as training_main


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tmp_path_factory.mktemp("sites")
    busi = write_busi_folder(base / "busi", per_class=6)
    busbra = write_busbra_folder(base / "bus-bra-copy", patients=12)
    return [busi, busbra]


def test_every_sample_carries_its_site_group_and_scanner(two_sites):
    samples = sites.scan_sites(two_sites)
    by_site = Counter(s.site for s in samples)
    assert by_site == {"busi": 18, "bus-bra": 18}  # 12 patients, 6 with two views
    busbra = [s for s in samples if s.site == "bus-bra"]
    # patients are the groups: the two views of patient 1 share one
    views = [s for s in busbra if s.image_path.stem.startswith("bus_0001-")]
    assert len(views) == 2 and views[0].group == views[1].group == "bus-bra:patient1"
    assert {s.device for s in busbra} == {"GE Logiq 5", "GE Logiq 7", "Toshiba Aplio 300"}
    assert all(s.key.startswith(f"{s.site}/{s.class_name}/") for s in samples)
    assert {s.device for s in samples if s.site == "busi"} == {sites.UNRECORDED_DEVICE}
    assert len({s.key for s in samples}) == len(samples)


def test_a_bus_bra_image_filed_under_the_wrong_class_is_refused(tmp_path):
    root = write_busbra_folder(tmp_path / "bb", patients=3)
    moved = next((root / "benign").glob("*_mask.png")).name.replace("_mask", "")
    (root / "benign" / moved).rename(root / "malignant" / moved)
    with pytest.raises(ValueError, match="table says"):
        sites.scan_site(root)


def test_two_folders_of_the_same_site_are_refused(two_sites, tmp_path):
    other = write_busbra_folder(tmp_path / "another", patients=3)
    with pytest.raises(ValueError, match="same site"):
        sites.scan_sites([two_sites[1], other])


def test_folds_keep_patients_together_and_stratify_by_site_and_class(two_sites):
    samples = sites.scan_sites(two_sites)
    document = sites.make_site_folds(samples, k=3)
    items = document["items"]
    folds_of_group: dict[str, set[int]] = {}
    for s in samples:
        folds_of_group.setdefault(s.group, set()).add(items[s.key]["fold"])
    assert all(len(f) == 1 for f in folds_of_group.values())
    for site in ("busi", "bus-bra"):
        for label in range(len(CLASS_NAMES)):
            per_fold = Counter(
                items[s.key]["fold"] for s in samples if s.site == site and s.label == label
            )
            if per_fold:  # every (site, class) is spread over the folds, not piled in one
                assert max(per_fold.values()) - min(per_fold.get(f, 0) for f in range(3)) <= 2


def test_holdout_splits_by_site_device_and_fold(two_sites):
    samples = sites.scan_sites(two_sites)
    folds = sites.make_site_folds(samples, k=3)["items"]
    train, test = sites.split_holdout(samples, "site:bus-bra", None)
    assert {samples[i].site for i in test} == {"bus-bra"}
    assert {samples[i].site for i in train} == {"busi"}
    train, test = sites.split_holdout(samples, "device:GE Logiq 5", None)
    assert {samples[i].device for i in test} == {"GE Logiq 5"}
    assert "GE Logiq 5" not in {samples[i].device for i in train}
    train, test = sites.split_holdout(samples, "fold:1", folds)
    assert {folds[samples[i].key]["fold"] for i in test} == {1}
    assert not {samples[i].group for i in train} & {samples[i].group for i in test}
    for bad in ("site:nowhere", "scanner:x", "fold:0"):
        with pytest.raises(ValueError):
            sites.split_holdout(samples, bad, None)


def test_site_figures_are_defined_for_a_site_without_normals():
    rows = [
        {"label": 2, "probs": [0.1, 0.2, 0.7], "dice": 0.8, "mask_pixels": 9},
        {"label": 2, "probs": [0.6, 0.3, 0.1], "dice": 0.0, "mask_pixels": 0},
        {"label": 1, "probs": [0.1, 0.8, 0.1], "dice": 0.6, "mask_pixels": 4},
    ]
    fig = sites.site_figures(rows)
    assert fig["accuracy"] == pytest.approx(2 / 3)
    assert fig["malignant_sensitivity"] == pytest.approx(0.5)
    assert fig["malignant_auc"] == pytest.approx(0.75)  # (0.7 > 0.1: 1, 0.1 = 0.1: 0.5) / 2
    assert fig["lesion_called_normal"] == pytest.approx(1 / 3)
    assert np.isnan(fig["normal_called_lesion"]) and np.isnan(fig["lesion_auc"])
    assert sites.predicted_mix(rows) == {"normal": 1, "benign": 1, "malignant": 1}


def test_lesion_free_band_stays_away_from_the_lesion():
    image = np.arange(100 * 80, dtype=np.uint32).reshape(100, 80).astype(np.uint8)
    mask = np.zeros_like(image)
    mask[70:90, 20:60] = 255  # a lesion low in the frame: the band above it is the largest
    band = augment.lesion_free_band(image, mask)
    assert band is not None and band.shape[1] == 80 and 50 <= band.shape[0] < 70
    np.testing.assert_array_equal(band, image[: band.shape[0]])
    whole = np.full_like(mask, 255)
    assert augment.lesion_free_band(image, whole) is None  # nothing free of the lesion
    assert augment.lesion_free_band(image, np.zeros_like(mask)) is None  # no lesion to avoid


def test_appearance_changes_the_image_not_its_shape_and_is_off_at_p0():
    rng_image = np.random.default_rng(0).integers(30, 200, size=(64, 48)).astype(np.uint8)
    changed = augment.appearance(rng_image, augment.Appearance(p=1.0), random.Random(3))
    assert changed.shape == rng_image.shape and changed.dtype == np.uint8
    assert not np.array_equal(changed, rng_image)
    same = augment.appearance(rng_image, augment.Appearance(p=0.0), random.Random(3))
    assert same is rng_image


def test_a_site_without_normals_lends_lesion_free_bands_as_normals(two_sites):
    samples = sites.scan_sites(two_sites)
    assert joint.sites_without_normals(samples) == {"bus-bra"}
    preset = joint.replace(joint.get_preset("joint-smoke"), normal_patch_p=1.0, appearance_p=1.0)
    from training.data import load_split_images

    data = load_split_images([s for s in samples if s.site == "bus-bra"] + samples[:3])
    dataset = joint.JointDataset(data, joint.preprocessing_for(preset), preset, seed=0)
    dataset.set_epoch(0)
    normal = CLASS_NAMES.index("normal")
    converted = [dataset[i][1] for i in range(18)]
    as_normal = [(label, mask) for label, mask in converted if int(label) == normal]
    assert as_normal, "no lesion scan of the site without normals became normal tissue"
    assert all(float(mask.sum()) == 0.0 for _, mask in as_normal)  # no lesion in the target
    labels = joint.expected_labels(data.samples, preset)
    assert labels.count(normal) >= 18  # every BUS-BRA scan counted as normal at p=1


@pytest.mark.slow
def test_sites_command_trains_without_a_site_and_reports_per_site(two_sites, tmp_path):
    out = tmp_path / "run"
    argv = ["sites", "--data-path", *map(str, two_sites), "--holdout", "site:bus-bra"]
    argv += ["--smoke", "--max-per-class", "4", "--output-dir", str(out), "--no-progress"]
    assert training_main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["trained_on"]) == {"busi"} and set(result["figures"]) == {"bus-bra"}
    figure = result["figures"]["bus-bra"]
    assert figure["n"] == 8.0
    assert set(figure["devices"]) <= {"GE Logiq 5", "GE Logiq 7", "Toshiba Aplio 300"}
    rows = json.loads((out / "rows.json").read_text())["rows"]
    assert all(r["site"] == "bus-bra" and r["group"].startswith("bus-bra:") for r in rows)
    assert (out / "weights.pt").is_file() and not (out / "checkpoint.pt").exists()
    report = tmp_path / "report.md"
    assert training_main(["sites-report", "--runs", str(out), "--output", str(report)]) == 0
    text = report.read_text()
    assert "site:bus-bra → bus-bra" in text and "malignant sensitivity" in text


@pytest.mark.slow
def test_a_fold_run_publishes_with_per_site_and_held_out_site_figures(two_sites, tmp_path):
    from shared.store import verify_artifact

    out = tmp_path / "fold"
    folds = tmp_path / "folds.json"
    argv = ["sites", "--data-path", *map(str, two_sites), "--holdout", "fold:0"]
    argv += ["--split-file", str(folds), "--smoke", "--output-dir", str(out), "--no-progress"]
    assert training_main(argv) == 0
    assert json.loads(folds.read_text())["k"] == 5  # made there, then used
    report = tmp_path / "report.md"
    assert training_main(["sites-report", "--runs", str(out), "--output", str(report)]) == 0
    models = tmp_path / "models"
    argv = ["sites-publish", "--run", str(out), "--data-path", *map(str, two_sites)]
    argv += ["--split-file", str(folds), "--report", str(report.with_suffix(".json"))]
    argv += ["--model-dir", str(models), "--version", "v1", "--bootstrap", "20"]
    assert training_main(argv) == 0
    manifest = verify_artifact(models, "diagnosis", "v1").metadata
    metrics = manifest["metrics"]
    assert metrics["kind"] == "site-held-out" and set(metrics["sites"]) == {"busi", "bus-bra"}
    assert set(metrics["scope"]["trained_on"]) == {"busi", "bus-bra"}
    assert metrics["cross_validation"]["plain"]["n"] == sum(
        int(f["n"]) for f in metrics["sites"].values()
    )
    # trained on a fold's complement: the manifest's data fingerprint counts those images only
    assert manifest["data_fingerprint"]["n_images"] == sum(
        d["images"] for d in metrics["scope"]["trained_on"].values()
    )


def _site_result(preset: str, site: str, auc: float, sensitivity: float) -> dict:
    fig = {"malignant_auc": auc, "malignant_sensitivity": sensitivity, "lesion_dice": 0.5}
    return {"preset": preset, "holdout": f"site:{site}", "figures": {site: fig}}


def test_recipes_are_ranked_by_their_worst_held_out_site() -> None:
    results = [
        # a: the better of the two on bus-bra, the worse on busi: its worst site is busi (0.70)
        _site_result("a", "bus-bra", 0.90, 0.8),
        _site_result("a", "busi", 0.70, 0.7),
        _site_result("b", "bus-bra", 0.80, 0.6),
        _site_result("b", "busi", 0.85, 0.9),
        # c: best single figure, but run on one site only: ranked after those run on both
        _site_result("c", "bus-bra", 0.99, 0.9),
    ]
    lines = sites.recipe_table(results)
    rows = [line for line in lines if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == ["b", "a", "c"]
    assert rows[0].endswith("| 0.800 | 0.600 | 0.500 |")
    assert "| not run | not run |" in rows[2]
    assert sites.recipe_table(results[:2]) == []  # one recipe: nothing to compare


def test_zoom_crop_keeps_the_whole_lesion_and_zooms_normal_tissue() -> None:
    rng = random.Random(3)
    image = np.arange(300 * 200, dtype=np.uint32).reshape(300, 200).astype(np.uint8)
    mask = np.zeros_like(image)
    mask[100:150, 50:120] = 255
    shapes = set()
    for _ in range(100):
        out_image, out_mask = augment.zoom_crop(image, mask, rng)
        assert out_image.shape == out_mask.shape
        assert (out_mask > 0).sum() == (mask > 0).sum()  # the whole lesion, every time
        shapes.add(out_image.shape)
    assert len(shapes) > 50 and min(h for h, _ in shapes) < 200  # zoomed in, not just copied
    huge = np.full_like(mask, 255)  # a lesion filling the frame: the frame itself
    assert augment.zoom_crop(image, huge, rng)[0].shape == image.shape
    normal = augment.zoom_crop(image, np.zeros_like(mask), random.Random(0))[0]
    assert normal.shape[0] <= 300 and normal.shape[1] <= 200


def test_site_balanced_epochs_give_every_site_the_same_share(two_sites) -> None:
    from training.data import SiteBalancedSampler, site_weights

    samples = sites.scan_sites(two_sites)
    samples = [s for s in samples if s.site == "busi"][:6] + [
        s for s in samples if s.site == "bus-bra"
    ]  # 6 against 18: three to one
    weights = site_weights(samples)
    assert weights[:6].sum() == pytest.approx(0.5) and weights[6:].sum() == pytest.approx(0.5)
    sampler = SiteBalancedSampler(samples * 50, seed=3)  # 1,200 draws an epoch
    first, second = list(sampler), list(sampler)
    assert len(first) == len(sampler) == 1200 and first != second  # a new draw every epoch
    busi_share = np.mean([(samples * 50)[i].site == "busi" for i in first])
    assert 0.45 < busi_share < 0.55  # uniform shuffling would give 0.25
    # under torchrun: the same epoch on every rank, each rank its own disjoint share
    ranks = [SiteBalancedSampler(samples * 50, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    shards = [list(r) for r in ranks]
    assert [len(s) for s in shards] == [600, 600]
    merged = [shards[i % 2][i // 2] for i in range(1200)]
    assert merged == first
    # one site: every image equally likely, as the recipe without balancing
    assert np.allclose(site_weights(samples[6:]), 1 / 18)


def test_class_weights_follow_the_draws_of_a_site_balanced_epoch() -> None:
    from training.losses import class_weights

    labels = [0, 1, 1, 1]
    assert class_weights(labels).tolist() == pytest.approx([4 / 3, 4 / 9, 4 / 3])  # absent: as 1
    plain = class_weights(labels, draw_weights=np.ones(4))
    assert plain.tolist() == pytest.approx(class_weights(labels).tolist())
    # the normal scan drawn half the time: normal and benign then weigh the same
    balanced = class_weights(labels, draw_weights=np.array([3.0, 1.0, 1.0, 1.0]))
    assert balanced[0] == pytest.approx(balanced[1])


def test_a_site_balanced_recipe_trains_on_two_sites(two_sites, tmp_path) -> None:
    out = tmp_path / "balanced"
    argv = ["sites", "--data-path", *map(str, two_sites), "--holdout", "fold:0"]
    argv += ["--preset", "joint-sites-balanced-zoom-lite0", "--smoke"]
    argv += [
        "--split-file",
        str(tmp_path / "folds.json"),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    assert training_main(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["preset"] == "joint-sites-balanced-zoom-lite0"
    assert result["recipe"]["site_balanced"] is True
    assert set(result["figures"]) == {"busi", "bus-bra"}


def test_the_mask_head_rule_calls_normal_exactly_what_it_does_not_draw(tmp_path) -> None:
    from training.studies import normal_decision

    def row(label: int, probs: list[float], pixels: int, group: str) -> dict:
        return {"label": label, "probs": probs, "mask_pixels": pixels, "dice": 0.5} | {
            "site": "busi",
            "device": "unrecorded",
            "group": group,
            "key": group,
        }

    rows = [
        row(1, [0.7, 0.2, 0.1], 40, "a"),  # a lesion the class head calls normal, drawn
        row(0, [0.8, 0.1, 0.1], 12, "b"),  # a normal scan with a speck drawn
        row(2, [0.1, 0.3, 0.6], 0, "c"),  # a malignant lesion called malignant, nothing drawn
        row(0, [0.9, 0.05, 0.05], 0, "d"),
    ]
    decided = [normal_decision.mask_decides_normal(r)["probs"] for r in rows]
    assert decided[0] == pytest.approx([0.0, 2 / 3, 1 / 3])
    assert np.argmax(decided[1]) != 0 and decided[2] == [1.0, 0.0, 0.0] == decided[3]
    run = tmp_path / "run"
    run.mkdir()
    (run / "rows.json").write_text(json.dumps({"holdout": "fold:0", "rows": rows}))
    (run / "result.json").write_text(json.dumps({"preset": "p", "holdout": "fold:0"}))
    out = tmp_path / "normal.md"
    assert (
        training_main(
            ["normal-decision", "--runs", str(run), "--output", str(out), "--bootstrap", "0"]
        )
        == 0
    )
    sites_ = json.loads(out.with_suffix(".json").read_text())[0]["sites"]["busi"]
    served, masked = sites_["class_head"], sites_["mask_head"]
    assert served["lesion_called_normal"] == 0.5 and served["normal_called_lesion"] == 0.0
    assert masked["lesion_called_normal"] == 0.5 and masked["normal_called_lesion"] == 0.5
    assert "mask head" in out.read_text()
