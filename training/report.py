"""report.md of a run: one frame for every task (what ran, how long, where it went), then the
task's own section (training.runner.Task.report_section). Every number comes from metrics.json."""

from __future__ import annotations

import math
from typing import Any

TITLES = {"classification": "Classification", "segmentation": "Segmentation"}


def fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    """`0.812 [0.751, 0.866]`; "n/a" for a missing or undefined value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = f"{value:.3f}"
    if ci and ci[0] is not None and not (isinstance(ci[0], float) and math.isnan(ci[0])):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def render_run_report(document: dict[str, Any], section: list[str]) -> str:
    """The Markdown report of one run: header, training summary, then `section`."""
    cfg = document["training"]
    title = TITLES.get(document["task"], document["task"].capitalize())
    lines = [f"# {title} run: `{document['preset']}`", ""]
    if document.get("description"):
        lines += [document["description"], ""]
    artifact = document.get("artifact")
    if artifact:
        lines += [
            f"Artifact: {artifact['task']}/{artifact['version']} "
            f"(sha256 {artifact['sha256'][:12]}...)",
            "",
        ]
    if document.get("command"):
        lines += ["Command:", "", f"    {document['command']}", ""]
    if cfg.get("smoke"):
        lines += ["**Smoke run** (tiny subset, 1 epoch): the numbers mean nothing.", ""]
    where = f"{cfg['threads']} torch threads, {cfg.get('device', 'cpu')}"
    if cfg.get("world_size", 1) > 1:
        where += f", {cfg['world_size']} processes"
    lines += [
        f"Training: {cfg['epochs_run']} epochs in {cfg['train_seconds'] / 60:.1f} min "
        f"({cfg['seconds_per_epoch']:.0f} s/epoch, {where}); seed {cfg['seed']}; weights of "
        f"epoch {cfg['best_epoch']} ({cfg['selection']}"
        + (")" if cfg["selection"] == "the last epoch" else ", validation split only)")
        + (f"; trained on {cfg['train_images']} images." if cfg.get("train_images") else "."),
        "",
    ]
    return "\n".join(lines + section) + "\n"
