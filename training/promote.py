"""`python -m training promote` / `demote`: the one way to change which version serves a task.

    python -m training promote <task> <version> [--model-dir D] [--from C] [--reason TEXT]
        [--shadow-metrics URL ...] [--metrics-key-file F] [--min-shadow-samples N] [--force]
    python -m training demote <task> [<version>] [--model-dir D] [--reason TEXT]

Training jobs publish candidates; the service serves, per task, the version last promoted in
`<model-dir>/promotions.json` (shared.promotion), provided it passes the gate there too. Promote
checks the gate first (floors from GATE_MIN_ACCURACY, GATE_MIN_DICE, GATE_MIN_EVAL_IMAGES; the
defaults otherwise) and with `--from` first copies the version from a candidates directory (e.g.
runs/candidate-models) into the model directory. Demote takes the serving version (or the one
named) out; the version promoted before it serves again. Every change is logged and appended to
the record's history; the running service picks it up at its next poll (RELOAD_INTERVAL_S).

Before a promotion is recorded the version is loaded and warmed up as the service loads it
(shared.warmup): one whose files pass their checksums but do not load is refused here, not by
every replica while the operator believes it serves. With `--shadow-metrics`, the /metrics of
replicas that ran the version in the shadow of the serving one (SHADOW_VERSION,
service/shadow.py) are read and the agreement figures shown; fewer than `--min-shadow-samples`
label comparisons refuse the promotion unless `--force`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import urllib.request
from pathlib import Path
from typing import Any

from shared.errors import ArtifactError
from shared.labels import TASKS
from shared.promotion import GateFloors, demote, promote, read_promotions
from shared.store import copy_artifact, verify_artifact
from shared.warmup import check_loads
from training import cli

log = logging.getLogger("training.promote")

DEFAULT_MODEL_DIR = Path("models")  # what scripts/serve.sh serves
DEFAULT_MIN_SHADOW_SAMPLES = 200
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def get_args_parser(command: str) -> argparse.ArgumentParser:
    promoting = command == "promote"
    parser = cli.command_parser(
        command,
        "Promote a published version so that it serves its task (after the gate)."
        if promoting
        else "Demote a promoted version: the one promoted before it serves again.",
    )
    parser.add_argument("task", choices=TASKS, help="the task")
    parser.add_argument(
        "version",
        nargs=None if promoting else "?",
        default=None,
        help="the version (folder name)" + ("" if promoting else "; default: the one serving"),
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="the model directory the service serves (default: models)",
    )
    if promoting:
        parser.add_argument(
            "--from",
            dest="source",
            type=Path,
            default=None,
            help="copy the version from this candidates directory first, e.g. "
            "runs/candidate-models (default: it is already in --model-dir)",
        )
        parser.add_argument(
            "--shadow-metrics",
            nargs="+",
            default=[],
            metavar="URL",
            help="/metrics URLs of replicas that ran this version in the shadow (SHADOW_VERSION):"
            " show its agreement figures and refuse too small a sample (default: none)",
        )
        parser.add_argument(
            "--metrics-key-file",
            type=Path,
            default=None,
            help="a file holding an API key with the `metrics` scope (default: none)",
        )
        parser.add_argument(
            "--min-shadow-samples",
            type=int,
            default=DEFAULT_MIN_SHADOW_SAMPLES,
            help=f"label comparisons needed (default: {DEFAULT_MIN_SHADOW_SAMPLES})",
        )
        parser.add_argument(
            "--force", action="store_true", help="promote even with too small a shadow sample"
        )
    parser.add_argument("--reason", default="", help="a note kept in the record's history")
    return parser


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of each sample of a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        try:
            samples.append((match["name"], labels, float(match["value"])))
        except ValueError:
            continue
    return samples


def shadow_figures(
    texts: list[str], task: str, candidate: str, serving: str | None
) -> dict[str, Any]:
    """The shadow figures of (serving, candidate) summed over the replicas' expositions."""
    agree = disagree = dice_sum = dice_count = 0.0
    dropped = scored = 0.0
    for text in texts:
        for name, labels, value in parse_metrics(text):
            if labels.get("task") != task or labels.get("candidate") != candidate:
                continue
            if serving is not None and labels.get("serving") != serving:
                continue
            if name == "busi_shadow_label_agreement_total":
                if labels.get("agree") == "true":
                    agree += value
                else:
                    disagree += value
            elif name == "busi_shadow_mask_dice_sum":
                dice_sum += value
            elif name == "busi_shadow_mask_dice_count":
                dice_count += value
            elif name == "busi_shadow_requests_total" and labels.get("outcome") == "dropped":
                dropped += value
            elif name == "busi_shadow_requests_total" and labels.get("outcome") == "scored":
                scored += value
    compared = int(agree + disagree)
    return {
        "serving": serving,
        "candidate": candidate,
        "scored": int(scored),
        "dropped": int(dropped),
        "label_comparisons": compared,
        "label_agreement": agree / compared if compared else None,
        "mask_comparisons": int(dice_count),
        "mean_mask_dice": dice_sum / dice_count if dice_count else None,
    }


def _read_metrics(url: str, key_file: Path | None) -> str:
    request = urllib.request.Request(url)
    if key_file is not None:
        request.add_header("Authorization", f"Bearer {key_file.read_text().strip()}")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (operator's URL)
        return response.read().decode("utf-8")


def check_shadow(args: argparse.Namespace) -> dict[str, Any] | None:
    """The shadow figures (logged); raises ValueError when the sample is too small and not
    forced, or a replica's metrics cannot be read."""
    if not args.shadow_metrics:
        return None
    record = read_promotions(args.model_dir)
    serving = record.serving(args.task) if record else None
    try:
        texts = [_read_metrics(url, args.metrics_key_file) for url in args.shadow_metrics]
    except OSError as exc:
        raise ValueError(f"the shadow figures could not be read: {exc}") from exc
    figures = shadow_figures(texts, args.task, args.version, serving)
    agreement = figures["label_agreement"]
    dice = figures["mean_mask_dice"]
    log.info(
        "shadow figures of %s %s beside %s: %d label comparisons, agreement %s; %d masks, "
        "mean Dice %s; %d dropped",
        args.task, args.version, serving, figures["label_comparisons"],
        "n/a" if agreement is None else f"{agreement:.3f}", figures["mask_comparisons"],
        "n/a" if dice is None else f"{dice:.3f}", figures["dropped"],
    )  # fmt: skip
    if figures["label_comparisons"] + figures["mask_comparisons"] == 0 or (
        max(figures["label_comparisons"], figures["mask_comparisons"]) < args.min_shadow_samples
    ):
        why = (
            f"the shadow sample is too small: {figures['label_comparisons']} label and "
            f"{figures['mask_comparisons']} mask comparisons, fewer than {args.min_shadow_samples}"
        )
        if not args.force:
            raise ValueError(why + " (--force promotes all the same)")
        log.warning("%s; promoting all the same (--force)", why)
    return figures


def main(command: str, argv: list[str]) -> int:
    """Run `promote` or `demote`; returns the exit status (1 when refused)."""
    args = get_args_parser(command).parse_args(argv)
    try:
        if command == "promote":
            if args.source is not None:
                info = copy_artifact(args.source, args.model_dir, args.task, args.version)
                log.info("copied %s version %s into %s", args.task, args.version, info.path)
            shadow = check_shadow(args)
            info = verify_artifact(args.model_dir, args.task, args.version)
            warmed = check_loads(info)  # ArtifactIntegrityError: it would not serve
            log.info(
                "%s version %s loads and warms up (%s, %.1f s)%s", args.task, args.version,
                warmed.runtime, warmed.seconds,
                f"; {warmed.onnx_note}, so TorchScript would serve" if warmed.onnx_note else "",
            )  # fmt: skip
            floors = GateFloors.from_env()
            record = promote(args.model_dir, args.task, args.version, floors, reason=args.reason)
            if shadow is not None:
                log.info("promoted with shadow figures %s", json.dumps(shadow))
        else:
            record = demote(args.model_dir, args.task, args.version, reason=args.reason)
    except (ArtifactError, ValueError) as exc:
        log.error("%s refused: %s", command, getattr(exc, "message", str(exc)))
        return 1
    print(json.dumps({"task": args.task, "serving": record.serving(args.task),
                      "promoted": list(record.stack(args.task))}))  # fmt: skip
    return 0
