"""`python -m training promote` / `demote`: the one way to change which version serves a task.

    python -m training promote <task> <version> [--model-dir D] [--from C] [--reason TEXT]
    python -m training demote <task> [<version>] [--model-dir D] [--reason TEXT]

Training jobs publish candidates; the service serves, per task, the version last promoted in
`<model-dir>/promotions.json` (shared.promotion), provided it passes the gate there too. Promote
checks the gate first (floors from GATE_MIN_ACCURACY, GATE_MIN_DICE, GATE_MIN_EVAL_IMAGES; the
defaults otherwise) and with `--from` first copies the version from a candidates directory (e.g.
runs/candidate-models) into the model directory. Demote takes the serving version (or the one
named) out; the version promoted before it serves again. Every change is logged and appended to
the record's history; the running service picks it up at its next poll (RELOAD_INTERVAL_S).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from shared.artifacts import copy_artifact
from shared.errors import ArtifactError
from shared.labels import TASKS
from shared.promotion import GateFloors, demote, promote

log = logging.getLogger("training.promote")

DEFAULT_MODEL_DIR = Path("models")  # what scripts/serve.sh serves


def get_args_parser(command: str) -> argparse.ArgumentParser:
    promoting = command == "promote"
    parser = argparse.ArgumentParser(
        prog=f"python -m training {command}",
        description=(
            "Promote a published version so that it serves its task (after the gate)."
            if promoting
            else "Demote a promoted version: the one promoted before it serves again."
        ),
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
    parser.add_argument("--reason", default="", help="a note kept in the record's history")
    return parser


def main(command: str, argv: list[str]) -> int:
    """Run `promote` or `demote`; returns the exit status (1 when refused)."""
    args = get_args_parser(command).parse_args(argv)
    try:
        if command == "promote":
            if args.source is not None:
                info = copy_artifact(args.source, args.model_dir, args.task, args.version)
                log.info("copied %s version %s into %s", args.task, args.version, info.path)
            floors = GateFloors.from_env()
            record = promote(args.model_dir, args.task, args.version, floors, reason=args.reason)
        else:
            record = demote(args.model_dir, args.task, args.version, reason=args.reason)
    except (ArtifactError, ValueError) as exc:
        log.error("%s refused: %s", command, getattr(exc, "message", str(exc)))
        return 1
    print(json.dumps({"task": args.task, "serving": record.serving(args.task),
                      "promoted": list(record.stack(args.task))}))  # fmt: skip
    return 0
