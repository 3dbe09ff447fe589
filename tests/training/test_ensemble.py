"""`python -m training sites-ensemble`: a recipe's fold runs pooled into its cross-validation and
made one served network, published and rebuilt, on synthetic folders (no real data needed)."""

from __future__ import annotations

import json

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
