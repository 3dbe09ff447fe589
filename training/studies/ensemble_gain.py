"""What averaging several networks buys on a site none of them trained on.

    python -m training ensemble-gain --runs R1 R2 R3 [--output F.md]

The runs are `python -m training sites` runs of one recipe and one holdout that differ only in
their seed. Each run's class logits of the held-out images (its rows.json) are averaged over the
runs, as shared.models.joint.JointEnsemble averages its members, and the class figures of that
average are set beside each run's own, with intervals over patients or near-duplicate groups.
Only class figures: the rows keep each image's Dice, not its mask, so the averaged mask is not
known here.

The shipped ensemble averages fold models, which differ in their data as well as their seed, and
every image trained four of them, so its gain cannot be measured on the images it trained on. A
recipe trained without a site, several times, can: this is that measurement. It informs and
chooses nothing: what ships was decided before it ran (training/ensemble.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from shared.postprocessing import softmax
from training import cli
from training.sites import figure_cell, figures_with_intervals, training_recipe
from training.studies import add_report_arguments, write_report

CLASS_FIGURES = (
    ("accuracy", "accuracy"),
    ("malignant_auc", "malignant AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_called_normal", "lesions called normal"),
)


def average_rows(runs_rows: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each image's class logits averaged over the runs (the same images in every run; raises
    ValueError otherwise), probabilities their softmax; Dice undefined (no mask here)."""
    keys = [sorted(r["key"] for r in rows) for rows in runs_rows]
    if any(k != keys[0] for k in keys[1:]):
        raise ValueError("the runs scored different images: not one holdout")
    by_key = [{r["key"]: r for r in rows} for rows in runs_rows]
    out = []
    for key in keys[0]:
        first = by_key[0][key]
        logits = np.mean([np.asarray(run[key]["logits"], dtype=np.float64) for run in by_key], 0)
        out.append(
            {
                **{k: first[k] for k in ("key", "label", "site", "device", "group")},
                "logits": [round(float(v), 5) for v in logits],
                "probs": [round(float(v), 6) for v in softmax(logits)],
                "dice": math.nan,
                "mask_pixels": 0,
            }
        )
    return out


def ensemble_gain(runs: list[Path], n_resamples: int) -> dict[str, Any]:
    """Each run's class figures on its held-out images, and those of the runs' averaged logits,
    per site scored. Raises ValueError unless the runs are one recipe's, one holdout's."""
    results = [json.loads((Path(r) / "result.json").read_text()) for r in runs]
    if len({r["holdout"] for r in results}) != 1:
        raise ValueError("the runs hold out different images: one holdout only")
    if any(training_recipe(r) != training_recipe(results[0]) for r in results[1:]):
        raise ValueError("the runs are different recipes: only their seed may differ")
    if len({r["seed"] for r in results}) != len(results):
        raise ValueError("two runs share a seed: they are the same network")
    rows = [json.loads((Path(r) / "rows.json").read_text())["rows"] for r in runs]
    averaged = average_rows(rows)
    sites = sorted({r["site"] for r in averaged})

    def figures(these: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            site: figures_with_intervals([r for r in these if r["site"] == site], n_resamples)
            for site in sites
        }

    return {
        "holdout": results[0]["holdout"],
        "preset": results[0]["preset"],
        "runs": [
            {"run": str(run), "seed": res["seed"], "figures": figures(these)}
            for run, res, these in zip(runs, results, rows, strict=True)
        ],
        "average": figures(averaged),
        "bootstrap": {"resamples": n_resamples, "unit": "patient or near-duplicate group"},
    }


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    lines = [
        f"# Averaging {len(runs)} networks on a held-out site",
        "",
        f"`{report['preset']}`, held out `{report['holdout']}`; each column one seed's network, "
        "then the mean of their class logits (what an ensemble of them answers). 95% intervals "
        f"over {report['bootstrap']['unit']}s, {report['bootstrap']['resamples']} resamples. "
        "Made by `python -m training ensemble-gain`.",
        "",
    ]
    for site, average in report["average"].items():
        head = [f"seed {r['seed']}" for r in runs] + [f"mean of the {len(runs)}"]
        lines += [
            f"## {site} ({int(average['n'])} images)",
            "",
            "| figure | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(head),
        ]
        for key, label in CLASS_FIGURES:
            cells = [figure_cell(r["figures"][site], key) for r in runs]
            cells.append(figure_cell(average, key))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Runs:", ""] + [f"- {r['run']} (seed {r['seed']})" for r in runs] + [""]
    return "\n".join(lines)


def main(argv: list[str]) -> Path:
    parser = cli.command_parser(
        "ensemble-gain",
        "Class figures of several seeds' networks on one holdout, and of their mean",
    )
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="sites run folders")
    add_report_arguments(parser, "training/reports/sites/ensemble-gain.md")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs")
    report = ensemble_gain(args.runs, args.bootstrap)
    return write_report(args.output, render(report), report)
