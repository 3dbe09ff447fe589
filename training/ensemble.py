"""The fold models of one recipe as one served network, and the cross-validation they make.

    python -m training sites-ensemble --runs R/fold-0 R/fold-1 ... R/fold-4 --data-path D1 D2
        [--no-flip-tta] [--output-dir R/ensemble]

Each run is a `python -m training sites --holdout fold:<k>` run of the same recipe, one per fold
of the same fold file, so every image was held out by exactly one of them. The command re-scores
each fold model on the images its fold held out, in the form the ensemble serves it (without flip
averaging under --no-flip-tta), and pools those rows: the recipe's k-fold cross-validation, per
site and per scanner, with intervals over patients or near-duplicate groups. It writes

    <output>/rows.json     every image, scored by the member that did not train on it
    <output>/result.json   pooled figures per site, each member's own, the members' runs
    <output>/weights.pt    the state dict of the shared.models.joint.JointEnsemble of the members

and `python -m training sites-publish --run <output>` publishes the ensemble as one `diagnosis`
model whose per-site figures are those pooled out-of-fold ones. No figure of the ensemble itself
on these images exists: every image trained all members but one.

What ships, decided on 2026-12-05 while folds 1-4 of joint-sites-zoom-lite0 were still training,
before any of their figures existed: the five fold models as one ensemble, without flip
averaging, replace the single fold-0 model if

1. every member trained: each site's malignant AUC on the member's own fold is at least 0.80;
2. export-onnx's validation holds (runtime agreement, the quality check's floors on both sites);
3. the bench's bare /diagnose forward in ONNX Runtime stays within 60 ms on the 2-core machine.

Why without flip averaging: in a throwaway timing of five random-weight Lite0 networks (under
training load, not a bench), their forward with it took 5.3x one flip-averaged network and
without it 2.6x (about 90 and 45 ms on an idle machine): only the latter fits 60 ms, and
five networks trained on different fifths already average away more variance than a mirror does.
The pooled out-of-fold figures are reported, not used to choose between the ensemble and the
fold-0 model: the ensemble has no held-out figures of its own to compare with.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from shared.models.joint import JointEnsemble
from training import cli, engine
from training.data import load_split_images
from training.sites import (
    DEFAULT_SITE_FOLDS,
    breakdown,
    brief,
    describe,
    load_site_folds,
    scan_sites,
    score,
    split_holdout,
    subset_per_site_class,
    training_recipe,
    write_json,
)

log = logging.getLogger(__name__)

HOLDOUT_PREFIX = "folds:"


def ensemble_holdout(folds: list[int]) -> str:
    """The `holdout` an ensemble's result names: every fold, each held out by one member."""
    return HOLDOUT_PREFIX + ",".join(str(k) for k in sorted(folds))


def is_ensemble(result: dict[str, Any]) -> bool:
    return str(result.get("holdout", "")).startswith(HOLDOUT_PREFIX)


def check_members(results: list[dict[str, Any]], n_folds: int) -> list[int]:
    """The folds of fold runs that make one ensemble, in run order. Raises ValueError unless they
    are `fold:<k>` runs of one preset, recipe and seed, one per fold of the fold file."""
    if not results:
        raise ValueError("an ensemble needs fold runs")
    folds = []
    for r in results:
        kind, _, k = r["holdout"].partition(":")
        if kind != "fold":
            raise ValueError(f"{r['holdout']} is not a fold run: members are fold:<k> runs")
        folds.append(int(k))
    first = results[0]
    for r in results[1:]:
        for key in ("preset", "seed", "smoke", "max_per_class"):
            if r.get(key) != first.get(key):
                raise ValueError(f"the runs differ in {key}: members are one recipe's fold runs")
        if training_recipe(r) != training_recipe(first):
            raise ValueError("the runs differ in recipe: members are one recipe's fold runs")
    if sorted(folds) != list(range(n_folds)):
        raise ValueError(
            f"the runs hold out folds {sorted(folds)}; the fold file has folds 0-{n_folds - 1} "
            "and every fold needs exactly one member"
        )
    return folds


def ensemble_main(args: argparse.Namespace) -> dict[str, Any]:
    """Score each member on its own fold, pool the rows, write the ensemble run folder."""
    from training.export_onnx import joint_preset
    from training.joint import build_model

    runs = [Path(r) for r in args.runs]
    results = [json.loads((run / "result.json").read_text()) for run in runs]
    samples = scan_sites(args.data_path)
    folds_of = load_site_folds(args.split_file, samples)
    n_folds = len({int(item["fold"]) for item in folds_of.values()})
    folds = check_members(results, n_folds)
    first = results[0]
    if first.get("max_per_class"):
        samples = subset_per_site_class(samples, int(first["max_per_class"]))
    trained = joint_preset({"preset": first["preset"], "recipe": first["recipe"]})
    served = replace(trained, flip_tta=trained.flip_tta and not args.no_flip_tta)
    threads = engine.configure_threads(args.threads)
    data = load_split_images(samples)

    members, rows, member_figures = [], [], []
    started = time.perf_counter()
    for run, result, fold in zip(runs, results, folds, strict=True):
        train_idx, test_idx = split_holdout(samples, f"fold:{fold}", folds_of)
        if describe([samples[i] for i in train_idx]) != result["trained_on"]:
            raise ValueError(f"{run}: the data folders are not the ones the run trained on")
        model = build_model(trained, pretrained=False)
        state = torch.load(run / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.eval()
        mine = [{**row, "member": fold} for row in score(model, served, data.pick(test_idx))]
        figures = breakdown(mine, args.bootstrap)
        for site, fig in figures.items():
            log.info("member fold:%d on its fold, site %s: %s", fold, site, brief(fig))
        member_figures.append(
            {
                "run": str(run),
                "holdout": result["holdout"],
                "train_seconds": result["train_seconds"],
                "figures": figures,
            }  # fmt: skip
        )
        members.append(model)
        rows += mine
    score_seconds = time.perf_counter() - started

    output = Path(args.output_dir)
    holdout = ensemble_holdout(folds)
    result = {
        "holdout": holdout,
        "preset": first["preset"],
        "recipe": asdict(served),
        "command": args.command_line,
        "seed": first["seed"],
        "smoke": first.get("smoke", False),
        "max_per_class": first.get("max_per_class"),
        "threads": threads,
        "device": "cpu",
        "train_seconds": round(sum(float(r["train_seconds"]) for r in results), 1),
        "score_seconds": round(score_seconds, 1),
        "history": first["history"],
        "trained_on": describe(samples),
        "scored": describe(samples),
        "figures": breakdown(rows, args.bootstrap),
        "bootstrap": {"resamples": args.bootstrap, "unit": "patient or near-duplicate group"},
        "ensemble": {
            "members": len(members),
            "flip_tta": served.flip_tta,
            "note": "figures: every image scored by the one member that did not train on it, in "
            "the form the ensemble serves it; the ensemble's members average their outputs",
            "member_runs": member_figures,
        },
    }
    write_json(output / "rows.json", {"holdout": holdout, "rows": rows})
    write_json(output / "result.json", result)
    torch.save(engine.cpu_state(JointEnsemble(members)), output / "weights.pt")
    for site, fig in result["figures"].items():
        log.info("%d folds pooled, site %s: %s", len(members), site, brief(fig))
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.command_parser(
        "sites-ensemble",
        "The fold runs of one recipe as one ensemble: their pooled out-of-fold figures per "
        "site, and the ensemble's weights for sites-publish",
    )
    parser.add_argument(
        "--runs", type=Path, nargs="+", required=True, help="the fold:<k> run folders"
    )
    parser.add_argument(
        "--data-path", type=Path, nargs="+", required=True, help="the folders they trained on"
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=DEFAULT_SITE_FOLDS,
        help="their fold file (default: training/splits/sites-5fold.json)",
    )
    parser.add_argument(
        "--no-flip-tta",
        action="store_true",
        help="the ensemble serves its members without flip averaging (scored so too)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="default: <runs>/ensemble")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: 1000)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 0)")
    args = parser.parse_args(argv)
    args.command_line = cli.command_line("sites-ensemble", argv)
    args.output_dir = args.output_dir or args.runs[0].parent / "ensemble"
    return args
