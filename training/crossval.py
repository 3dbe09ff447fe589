"""Grouped k-fold cross-validation of any task plug-in: `python -m training cv`.

    cross_validate(task, args)     one model per fold (all folds unless --folds), trained by the
                                   engine (training.runner.train_model) on the other folds and
                                   scored on its own: `<output>/fold<k>.json` (per-image rows),
                                   `fold<k>.pt` (its weights); a fold already written is skipped,
                                   a stopped one resumes from `fold<k>.ckpt`
    write_cv_report(task, ...)     once every fold is there: `oof.json` (the pooled rows),
                                   `report.json` and `report.md` (the task's figures with
                                   group-bootstrap intervals)

The folds are the data layer's (training.data: grouped by near-duplicate group, stratified by
class; made at --split-file when absent). A task takes part through four hooks besides the
engine's (`CrossValidated`): `score` (per-image rows of held-out images, by view), `figures`
(the figures of rows), `summarise` (pooled figures with intervals) and `render_cv_report`.
Under torchrun every rank trains each fold; rank 0 alone scores and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from training import distributed, engine
from training.data import (
    LoadedSplit,
    load_folds,
    load_split_images,
    scan_dataset,
    subset_per_class,
    write_folds,
)
from training.runner import Run, Task, start_run, train_model

log = logging.getLogger(__name__)

Row = dict[str, Any]


class CrossValidated(Task, Protocol):
    """A task plug-in the cross-validation driver can run."""

    def score(self, run: Run, model: nn.Module, data: LoadedSplit) -> dict[str, list[Row]]:
        """Per-image rows ("key", "label" and the task's own values) of held-out images, by
        view (e.g. the plain image and the image on wider canvases); the first view is the
        headline one."""

    def figures(self, rows: list[Row]) -> dict[str, float]:
        """The task's figures of a set of rows."""

    def summarise(self, rows_by_view: dict[str, list[Row]], n_resamples: int) -> dict[str, Any]:
        """The pooled figures of each view, with 95% group-bootstrap intervals (row["group"])."""

    def render_cv_report(self, report: dict[str, Any]) -> str:
        """report.md from the report.json document."""


def cross_validate(task: CrossValidated, args: argparse.Namespace) -> dict[str, Any]:
    """Train and score every fold still to do, then pool them (see the module docstring).

    Returns the report once every fold is done, else {"folds_done": n}; under torchrun the
    other ranks return {"rank": r}. Raises ValueError when the fold file does not match the
    data folder.
    """
    run = start_run(task, args)
    samples = scan_dataset(args.data_path)
    per_class = args.max_per_class or (task.smoke_per_class if args.smoke else None)
    if per_class:
        samples = subset_per_class(samples, per_class)
    folds_file = Path(args.split_file)
    if not folds_file.is_file() and distributed.is_main():
        log.warning("no fold file: making grouped 5-fold split at %s", folds_file)
        write_folds(args.data_path, folds_file, samples)
    distributed.barrier()  # under torchrun the other ranks read the file rank 0 wrote
    items = load_folds(folds_file, samples)
    k = int(json.loads(folds_file.read_text())["k"])
    output = run.output_dir
    todo = args.folds if args.folds is not None else list(range(k))
    data = load_split_images(samples) if todo and not args.report_only else None
    for fold in [] if args.report_only else todo:
        path = output / f"fold{fold}.json"
        if path.is_file():
            log.info("fold %d already done (%s)", fold, path)
            continue
        train_idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] != fold]
        test_idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] == fold]
        log.info("fold %d: training on %d, testing on %d", fold, len(train_idx), len(test_idx))
        run.data = {"train": data.pick(train_idx)}
        checkpoint = output / f"fold{fold}.ckpt"
        model, fit = train_model(
            task,
            run,
            seed=args.seed + fold,
            checkpoint=checkpoint,
            resume=engine.resume_point(checkpoint),
        )
        if not distributed.is_main():
            continue  # rank 0 evaluates and writes; the others go on to the next fold
        views = task.score(run, model, data.pick(test_idx))
        result = {
            "fold": fold,
            "preset": args.preset,
            "recipe": asdict(run.preset),
            "train_seconds": round(fit.seconds, 1),
            "threads": torch.get_num_threads(),
            "history": fit.history.to_dict(),
            "rows": {
                view: [{**row, "fold": fold, "group": items[row["key"]]["group"]} for row in rows]
                for view, rows in views.items()
            },
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
        torch.save(engine.cpu_state(model), output / f"fold{fold}.pt")  # for later analyses
        checkpoint.unlink(missing_ok=True)
        headline = next(iter(result["rows"].values()))
        log.info("fold %d: %s", fold, json.dumps(task.figures(headline)))
    if not distributed.is_main():
        return {"rank": distributed.rank()}
    done = sorted(output.glob("fold*.json"))
    if len(done) < k:
        log.info("%d of %d folds done; the pooled report waits for the rest", len(done), k)
        return {"folds_done": len(done)}
    return write_cv_report(task, output, args.preset, args.bootstrap)


def write_cv_report(
    task: CrossValidated, output: Path, preset_name: str, n_resamples: int = 1000
) -> dict[str, Any]:
    """Pool the fold files of `output` into oof.json, report.json and report.md."""
    folds = [json.loads(p.read_text()) for p in sorted(output.glob("fold*.json"))]
    views = list(folds[0]["rows"])
    pooled = {view: [r for f in folds for r in f["rows"][view]] for view in views}
    report = {
        "preset": preset_name,
        "recipe": folds[0]["recipe"],
        "k": len(folds),
        "pooled": task.summarise(pooled, n_resamples),
        "per_fold": [
            {
                "fold": f["fold"],
                "train_seconds": f["train_seconds"],
                **task.figures(f["rows"][views[0]]),
            }
            for f in folds
        ],
        "bootstrap": {
            "resamples": n_resamples,
            "unit": "near-duplicate group",
            "method": "percentile",
        },
    }
    (output / "oof.json").write_text(json.dumps(pooled) + "\n")
    (output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "report.md").write_text(task.render_cv_report(report))
    log.info("pooled out-of-fold figures: %s", json.dumps(report["pooled"][views[0]]))
    return report
