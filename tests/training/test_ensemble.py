"""`python -m training sites-ensemble`: a recipe's fold runs pooled into its cross-validation and
made one served network, published and rebuilt, on synthetic folders (no real data needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic_busi import write_busi_folder
from synthetic_sites import write_busbra_folder

from shared import inference
from shared.store import verify_artifact
from training import export_onnx, sites
from training.__main__ import main as training_main
from training.ensemble import check_members, ensemble_holdout, is_ensemble


def _run(holdout: str, recipe: dict | None = None, seed: int = 0) -> dict:
    recipe = recipe or {"size": 64}
    return {"holdout": holdout, "preset": "joint-smoke", "recipe": recipe, "seed": seed}


def test_members_are_one_recipes_fold_runs_one_per_fold():
    runs = [_run("fold:1"), _run("fold:0")]
    assert check_members(runs, 2) == [1, 0]
    assert ensemble_holdout([1, 0]) == "folds:0,1" and is_ensemble({"holdout": "folds:0,1"})
    with pytest.raises(ValueError, match="not a fold run"):
        check_members([_run("site:busi"), _run("fold:0")], 2)
    with pytest.raises(ValueError, match="differ in recipe"):
        check_members([_run("fold:0"), _run("fold:1", {"size": 96})], 2)
    # recorded before a field existed: trained with the preset's value of it, the same recipe
    assert check_members([_run("fold:0"), _run("fold:1", {"size": 64, "zoom_p": 0.0})], 2)
    # scored with or without the mirror: the same trained recipe
    assert check_members([_run("fold:0"), _run("fold:1", {"size": 64, "flip_tta": False})], 2)
    with pytest.raises(ValueError, match="differ in seed"):
        check_members([_run("fold:0"), _run("fold:1", seed=1)], 2)
    with pytest.raises(ValueError, match="exactly one member"):
        check_members([_run("fold:0"), _run("fold:0")], 2)
    with pytest.raises(ValueError, match="exactly one member"):
        check_members([_run("fold:0"), _run("fold:1")], 3)


@pytest.mark.slow
def test_fold_runs_make_an_ensemble_that_publishes_and_rebuilds(tmp_path):
    data = [
        write_busi_folder(tmp_path / "busi", per_class=6),
        write_busbra_folder(tmp_path / "bus-bra-copy", patients=12),
    ]
    paths = [str(p) for p in data]
    folds = tmp_path / "folds.json"
    sites.write_site_folds(sites.scan_sites(data), folds, k=2)
    runs = []
    for k in (0, 1):
        out = tmp_path / f"fold-{k}"
        argv = ["sites", "--data-path", *paths, "--holdout", f"fold:{k}", "--smoke"]
        argv += ["--split-file", str(folds), "--output-dir", str(out), "--no-progress"]
        assert training_main(argv) == 0
        runs.append(out)
    ensemble = tmp_path / "ensemble"
    argv = ["sites-ensemble", "--runs", *map(str, runs), "--data-path", *paths, "--no-flip-tta"]
    argv += ["--split-file", str(folds), "--bootstrap", "20", "--output-dir", str(ensemble)]
    assert training_main(argv) == 0

    result = json.loads((ensemble / "result.json").read_text())
    rows = json.loads((ensemble / "rows.json").read_text())["rows"]
    held = {k: {r["key"] for r in json.loads((run / "rows.json").read_text())["rows"]}
            for k, run in enumerate(runs)}  # fmt: skip
    # every image once, scored by the member whose fold held it out
    assert sorted(r["key"] for r in rows) == sorted(held[0] | held[1])
    assert all(r["key"] in held[r["member"]] for r in rows)
    assert result["holdout"] == "folds:0,1" and result["ensemble"]["members"] == 2
    assert result["recipe"]["flip_tta"] is False and result["ensemble"]["flip_tta"] is False
    assert set(result["figures"]) == {"busi", "bus-bra"}
    assert sum(int(f["n"]) for f in result["figures"].values()) == len(rows)
    assert [m["holdout"] for m in result["ensemble"]["member_runs"]] == ["fold:0", "fold:1"]

    report = tmp_path / "report.md"
    argv = ["sites-report", "--runs", *map(str, runs), str(ensemble), "--output", str(report)]
    assert training_main(argv) == 0
    assert "folds:0,1 → busi" in report.read_text()

    models = tmp_path / "models"
    argv = ["sites-publish", "--run", str(ensemble), "--data-path", *paths, "--bootstrap", "20"]
    argv += ["--split-file", str(folds), "--report", str(report.with_suffix(".json"))]
    argv += ["--model-dir", str(models), "--version", "e1"]
    assert training_main(argv) == 0
    info = verify_artifact(models, "diagnosis", "e1")
    manifest = info.metadata
    assert manifest["training"]["ensemble_members"] == 2
    assert manifest["training"]["flip_tta"] is False
    assert manifest["architecture"].endswith("_ensemble_of_2")
    metrics = manifest["metrics"]
    assert "2-fold cross-validation" in metrics["note"]
    assert metrics["holdout"] == "folds:0,1"
    assert metrics["cross_validation"]["plain"]["n"] == len(rows)
    # every image trained a member: the fingerprint counts them all
    assert manifest["data_fingerprint"]["n_images"] == len(rows)

    eager, preset = export_onnx.eager_model(info)  # rebuilt from model.pt and the manifest
    scripted = inference.load_module(info)
    x = torch.randn(2, 3, preset.size, preset.size)
    with torch.inference_mode():
        for rebuilt, shipped in zip(eager(x), scripted(x), strict=True):
            torch.testing.assert_close(rebuilt, shipped)


def _softmax(logits: list[float]) -> list[float]:
    z = np.exp(np.asarray(logits, dtype=float))
    return (z / z.sum()).tolist()


def _seed_run(folder, seed: int, logits: dict[str, list[float]], recipe: dict | None = None):
    folder.mkdir(parents=True)
    result = _run("site:bus-bra", recipe, seed)
    (folder / "result.json").write_text(json.dumps(result))
    labels = {"a": 2, "b": 1, "c": 2, "d": 1}
    rows = [
        {"key": k, "label": labels[k], "site": "bus-bra", "device": "GE Logiq 5",
         "group": f"bus-bra:{k}", "logits": v, "probs": _softmax(v), "dice": 0.5,
         "mask_pixels": 1}
        for k, v in logits.items()
    ]  # fmt: skip
    (folder / "rows.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_ensemble_gain_scores_the_mean_of_the_seeds_logits(tmp_path):
    from training.studies import ensemble_gain

    one = {"a": [0, 2, 1], "b": [0, 0, 3], "c": [0, 0, 4], "d": [0, 4, 0]}
    two = {"a": [0, 0, 4], "b": [0, 4, 0], "c": [0, 0, 2], "d": [0, 1, 2]}
    runs = [_seed_run(tmp_path / "s0", 0, one), _seed_run(tmp_path / "s1", 1, two)]
    report = ensemble_gain.ensemble_gain(runs, n_resamples=0)
    alone = [r["figures"]["bus-bra"]["accuracy"] for r in report["runs"]]
    assert alone == [0.5, 0.75]  # seed 0 misses a and b; seed 1 misses d
    # the mean of the logits: a [0, 1, 2.5] malignant, b [0, 2, 1.5] benign, c malignant,
    # d [0, 2.5, 1] benign: every image right
    assert report["average"]["bus-bra"]["accuracy"] == 1.0
    averaged = ensemble_gain.average_rows([json.loads((r / "rows.json").read_text())["rows"]
                                           for r in runs])  # fmt: skip
    assert [r["logits"] for r in averaged if r["key"] == "a"] == [[0.0, 1.0, 2.5]]
    out = tmp_path / "gain.md"
    argv = ["ensemble-gain", "--runs", *map(str, runs), "--output", str(out), "--bootstrap", "10"]
    assert training_main(argv) == 0
    assert "mean of the 2" in out.read_text() and out.with_suffix(".json").is_file()

    with pytest.raises(ValueError, match="share a seed"):
        ensemble_gain.ensemble_gain([runs[0], _seed_run(tmp_path / "s0b", 0, two)], 0)
    with pytest.raises(ValueError, match="different recipes"):
        ensemble_gain.ensemble_gain([runs[0], _seed_run(tmp_path / "s2", 2, two, {"size": 96})], 0)
    with pytest.raises(ValueError, match="different images"):
        ensemble_gain.ensemble_gain([runs[0], _seed_run(tmp_path / "s3", 3, {"a": [0, 0, 1]})], 0)
