"""Who decides "normal": the class head (what the service answers) or the mask head?

    python -m training normal-decision --runs R1 R2 ... [--output F]

One of the model issue's candidate remedies for "this site, so a lesion" (and its mirror, a
model trained at one hospital calling another hospital's lesions normal), measured on the rows
`python -m training sites` already wrote, without training anything: the same images, the same
predictions, two decision rules (default output: training/reports/sites/normal-decision.md).

- `class head` (served): the argmax of the three class probabilities; `/diagnose` draws the mask
  only when that class is a lesion.
- `mask head decides normal`: a scan is normal exactly when the mask head draws no pixel at the
  shipped threshold; a scan with a drawn lesion is benign or malignant by the class head's two
  lesion probabilities renormalised (p_m / (p_b + p_m) >= 0.5 is malignant). Its malignancy
  score is that ratio on drawn scans and 0 on undrawn ones (the AUC of the rule as a whole).

Both rules' figures come from `training.sites.figures_with_intervals` (95% intervals resampling
patients or near-duplicate groups), per run and site. The rule was written down before these
figures were computed; nothing in it is tuned (the threshold is the manifest's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from shared.labels import CLASS_NAMES
from training import cli
from training.sites import figure_cell, figures_with_intervals

NORMAL, BENIGN, MALIGNANT = (CLASS_NAMES.index(c) for c in ("normal", "benign", "malignant"))
FIGURES = (
    ("accuracy", "accuracy"),
    ("malignant_auc", "malignant AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_called_normal", "lesions called normal"),
    ("normal_called_lesion", "normals called a lesion"),
)


def mask_decides_normal(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with its probabilities replaced by the mask-head rule's: [1, 0, 0] when nothing is
    drawn, else [0, p_b, p_m] renormalised over the two lesion classes."""
    probs = np.asarray(row["probs"], dtype=np.float64)
    if row["mask_pixels"] <= 0:
        decided = np.eye(len(CLASS_NAMES))[NORMAL]
    else:
        lesion = probs[[BENIGN, MALIGNANT]]
        share = lesion / lesion.sum() if lesion.sum() > 0 else np.array([0.5, 0.5])
        decided = np.zeros(len(CLASS_NAMES))
        decided[BENIGN], decided[MALIGNANT] = share
    return {**row, "probs": decided.tolist()}


def compare_run(run: Path, n_resamples: int) -> dict[str, Any]:
    """Per site of the run's scored images: the figures under each rule."""
    result = json.loads((run / "result.json").read_text())
    rows = json.loads((run / "rows.json").read_text())["rows"]
    sites: dict[str, Any] = {}
    for site in sorted({r["site"] for r in rows}):
        mine = [r for r in rows if r["site"] == site]
        sites[site] = {
            "class_head": figures_with_intervals(mine, n_resamples),
            "mask_head": figures_with_intervals(
                [mask_decides_normal(r) for r in mine], n_resamples
            ),
        }
    return {
        "run": str(run),
        "preset": result["preset"],
        "holdout": result["holdout"],
        "sites": sites,
    }


def render(comparisons: list[dict[str, Any]]) -> str:
    lines = [
        '# Who decides "normal": the class head or the mask head',
        "",
        "The same rows of `python -m training sites` runs under two decision rules "
        "(`training/studies/normal_decision.py`): the class head's argmax, as served, and "
        '"normal exactly when the mask head draws nothing" (a drawn scan is benign or '
        "malignant by the renormalised lesion probabilities). 95% intervals resample patients "
        "(BUS-BRA) or near-duplicate groups (BUSI).",
        "",
        "| run → site | rule | " + " | ".join(label for _, label in FIGURES) + " |",
        "|---|---|" + "---|" * len(FIGURES),
    ]
    for comparison in comparisons:
        for site, rules in comparison["sites"].items():
            name = f"{comparison['preset']}: {comparison['holdout']} → {site}"
            for rule, label in (("class_head", "class head (served)"), ("mask_head", "mask head")):
                cells = " | ".join(figure_cell(rules[rule], key) for key, _ in FIGURES)
                lines.append(f"| {name} | {label} | {cells} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.command_parser(
        "normal-decision", "Class head or mask head deciding normal, on sites runs' rows."
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="sites run folders")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("training/reports/sites/normal-decision.md"),
        help="Markdown report (a .json beside it); default: %(default)s",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: 1000)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    comparisons = [compare_run(Path(run), args.bootstrap) for run in args.runs]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(comparisons))
    args.output.with_suffix(".json").write_text(json.dumps(comparisons, indent=1) + "\n")
    print(args.output)
    return args.output
