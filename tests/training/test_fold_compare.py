"""`python -m training fold-compare` on hand-made fold runs whose figures are worked out here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.labels import CLASS_NAMES
from training.__main__ import main as training_main
from training.studies import fold_compare

NORMAL, BENIGN, MALIGNANT = (CLASS_NAMES.index(c) for c in ("normal", "benign", "malignant"))


def _row(key: str, label: int, called: int, site: str, group: str) -> dict:
    probs = [0.1, 0.1, 0.1]
    probs[called] = 0.8
    return {"key": key, "label": label, "probs": probs, "logits": probs, "site": site,
            "device": "d", "group": group, "dice": 0.5 if label != NORMAL else 0.0,
            "mask_pixels": 0 if called == NORMAL else 10}  # fmt: skip


def _write(run: Path, preset: str, fold: int, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    result = {"holdout": f"fold:{fold}", "preset": preset, "recipe": {}, "seed": 0}
    (run / "result.json").write_text(json.dumps(result))
    (run / "rows.json").write_text(json.dumps({"holdout": f"fold:{fold}", "rows": rows}))
    return run


def _images(fold: int) -> list[tuple[str, int]]:
    """Two of each class per fold, one site; each image its own group."""
    return [(f"f{fold}-{c}-{i}", c) for c in (NORMAL, BENIGN, MALIGNANT) for i in range(2)]


@pytest.fixture
def runs(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    baseline, candidate = [], []
    for fold in (0, 1):
        images = _images(fold)
        right = [_row(k, y, y, "busi", k) for k, y in images]
        # The candidate calls fold 0's first malignant image benign: 11 of 12 right in all.
        wrong = [_row(k, y, BENIGN if k == "f0-2-0" else y, "busi", k) for k, y in images]
        baseline.append(_write(tmp_path / f"a{fold}", "joint-sites-zoom-lite0", fold, right))
        candidate.append(_write(tmp_path / f"b{fold}", "joint-sites-lite0", fold, wrong))
    return baseline, candidate


def test_the_folds_are_pooled_and_the_difference_is_paired(runs, tmp_path) -> None:
    baseline, candidate = runs
    report = fold_compare.compare(baseline, candidate, n_resamples=50)
    assert report["folds"] == ["fold:0", "fold:1"]
    busi = report["sites"]["busi"]
    assert busi["baseline"]["n"] == 12 and busi["baseline"]["accuracy"] == 1.0
    assert busi["candidate"]["accuracy"] == pytest.approx(11 / 12)
    assert busi["difference"]["accuracy"] == pytest.approx(-1 / 12)
    assert busi["difference"]["malignant_sensitivity"] == pytest.approx(-1 / 4)
    low, high = busi["difference"]["ci95"]["accuracy"]
    assert low <= -1 / 12 <= high <= 0.0  # the candidate never does better in any resample
    out = tmp_path / "cmp.md"
    argv = ["fold-compare", "--baseline", ",".join(map(str, baseline))]
    argv += ["--candidate", ",".join(map(str, candidate)), "--output", str(out)]
    assert training_main(argv) == 0
    text = out.read_text()
    assert "| accuracy | 1.000" in text and "-0.083" in text
    assert json.loads(out.with_suffix(".json").read_text())["folds"] == ["fold:0", "fold:1"]


def test_runs_of_other_folds_or_two_recipes_are_refused(runs, tmp_path) -> None:
    baseline, candidate = runs
    with pytest.raises(ValueError, match="different folds"):
        fold_compare.compare(baseline, candidate[:1], n_resamples=0)
    with pytest.raises(ValueError, match="each fold once"):
        fold_compare.compare(baseline, [candidate[0], candidate[0]], n_resamples=0)
    with pytest.raises(ValueError, match="different recipes"):
        fold_compare.compare([baseline[0], candidate[1]], candidate, n_resamples=0)
