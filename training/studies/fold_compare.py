"""Two recipes on the same folds, pooled, with the paired difference and its interval.

    python -m training fold-compare --baseline R0,R1 --candidate R0,R1 [--output F.md]

Each recipe is given by `python -m training sites` fold runs (`--holdout fold:k`), the same folds
for both. Each run's held-out rows (rows.json: every image scored by the network that did not
train on it, as its run scored it) are pooled per recipe, and the figures of each site are set
side by side with their difference (candidate minus baseline). The difference's interval
resamples patients or near-duplicate groups once for both recipes (a paired bootstrap): the
images are the same, so the noise they share cancels, and what remains is the recipes'.

This is how a recipe's adoption rule written before its fold runs is read (training/joint.py);
it chooses nothing by itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from training import cli
from training.metrics import group_bootstrap
from training.sites import (
    figure_cell,
    figures_with_intervals,
    site_figures,
    training_recipe,
)
from training.studies import add_report_arguments, write_report

FIGURES = (
    ("accuracy", "accuracy"),
    ("macro_auc", "macro AUC"),
    ("malignant_auc", "malignant AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_dice", "lesion Dice"),
    ("normal_with_lesion_diagnose", "normal scans with a lesion, /diagnose"),
    ("lesion_called_normal", "lesions called normal"),
)


def pooled_rows(runs: list[Path]) -> tuple[str, list[str], list[dict[str, Any]]]:
    """(preset, holdouts, rows) of one recipe's fold runs pooled. Raises ValueError unless they
    are fold runs of one recipe, each fold once."""
    results = [json.loads((Path(r) / "result.json").read_text()) for r in runs]
    holdouts = [r["holdout"] for r in results]
    if not all(h.startswith("fold:") for h in holdouts) or len(set(holdouts)) != len(holdouts):
        raise ValueError(f"fold runs, each fold once, are needed: {holdouts}")
    if any(training_recipe(r) != training_recipe(results[0]) for r in results[1:]):
        raise ValueError("the runs are different recipes")
    rows = [row for r in runs for row in json.loads((Path(r) / "rows.json").read_text())["rows"]]
    return results[0]["preset"], sorted(holdouts), rows


def _paired(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Candidate minus baseline of every figure, rows carrying both recipes' answers."""
    base = site_figures([r["baseline"] for r in rows])
    cand = site_figures([r["candidate"] for r in rows])
    return {k: cand[k] - base[k] for k in base if k != "n"}


def compare(baseline: list[Path], candidate: list[Path], n_resamples: int) -> dict[str, Any]:
    """Per site: each recipe's pooled figures with intervals and the paired difference."""
    base_preset, base_folds, base_rows = pooled_rows(baseline)
    cand_preset, cand_folds, cand_rows = pooled_rows(candidate)
    if base_folds != cand_folds:
        raise ValueError(f"the recipes were run on different folds: {base_folds}, {cand_folds}")
    by_key = {r["key"]: r for r in cand_rows}
    if sorted(by_key) != sorted(r["key"] for r in base_rows):
        raise ValueError("the recipes scored different images: another fold file?")
    sites: dict[str, Any] = {}
    for site in sorted({r["site"] for r in base_rows}):
        base = [r for r in base_rows if r["site"] == site]
        cand = [by_key[r["key"]] for r in base]
        paired = [
            {"group": b["group"], "baseline": b, "candidate": c}
            for b, c in zip(base, cand, strict=True)
        ]
        sites[site] = {
            "baseline": figures_with_intervals(base, n_resamples),
            "candidate": figures_with_intervals(cand, n_resamples),
            "difference": {
                **_paired(paired),
                "ci95": group_bootstrap(paired, n_resamples, 0, figures=_paired),
            },
        }
    return {
        "baseline": {"preset": base_preset, "runs": [str(r) for r in baseline]},
        "candidate": {"preset": cand_preset, "runs": [str(r) for r in candidate]},
        "folds": base_folds,
        "sites": sites,
        "bootstrap": {"resamples": n_resamples, "unit": "patient or near-duplicate group"},
    }


def _difference_cell(diff: dict[str, Any], key: str) -> str:
    value = diff.get(key, math.nan)
    if math.isnan(value):
        return "–"
    low, high = diff["ci95"].get(key, [math.nan, math.nan])
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def render(report: dict[str, Any]) -> str:
    base, cand = report["baseline"]["preset"], report["candidate"]["preset"]
    lines = [
        f"# `{cand}` against `{base}` on {', '.join(report['folds'])}",
        "",
        "Every image scored by the network of its recipe that did not train on it, as its run "
        "scored it; the folds pooled. 95% intervals over "
        f"{report['bootstrap']['unit']}s, {report['bootstrap']['resamples']} resamples; the "
        "difference's interval resamples the same groups for both recipes. Made by "
        "`python -m training fold-compare`.",
        "",
    ]
    for site, figs in report["sites"].items():
        lines += [
            f"## {site} ({int(figs['baseline']['n'])} images)",
            "",
            f"| figure | `{base}` | `{cand}` | difference |",
            "|---|---|---|---|",
        ]
        for key, label in FIGURES:
            if math.isnan(figs["baseline"].get(key, math.nan)):
                continue
            cells = [
                figure_cell(figs["baseline"], key),
                figure_cell(figs["candidate"], key),
                _difference_cell(figs["difference"], key),
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Runs:", ""]
    for side in ("baseline", "candidate"):
        lines += [f"- {report[side]['preset']}: {', '.join(report[side]['runs'])}"]
    return "\n".join([*lines, ""])


def _runs(value: str) -> list[Path]:
    return [Path(p) for p in value.split(",") if p]


def main(argv: list[str]) -> Path:
    parser = cli.command_parser(
        "fold-compare", "Two recipes' fold runs pooled, per site, with the paired difference"
    )
    parser.add_argument("--baseline", type=_runs, required=True, help="R0,R1,...: fold runs")
    parser.add_argument("--candidate", type=_runs, required=True, help="R0,R1,...: fold runs")
    add_report_arguments(parser, "training/reports/sites/fold-compare.md")
    args = parser.parse_args(argv)
    report = compare(args.baseline, args.candidate, args.bootstrap)
    return write_report(args.output, render(report), report)
