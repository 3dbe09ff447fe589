"""One-off studies: analyses run once to answer a question about a recipe or a model (its
calibration, its out-of-distribution check, its shortcuts, how recipes compare), apart from the
pipeline steps that train, export and publish. Their commands are `python -m training <study>`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_report_arguments(parser: argparse.ArgumentParser, default_output: str) -> None:
    """--output (a Markdown report, its .json beside it) and --bootstrap (resamples)."""
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(default_output),
        help="report to write, with its .json beside it",
    )
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default: 1000)")


def write_report(output: Path, markdown: str, document: Any) -> Path:
    """The Markdown report at `output` and its document as JSON beside it (atomically)."""
    from training.sites import write_json

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(markdown)
    write_json(output.with_suffix(".json"), document, indent=1)
    return output
