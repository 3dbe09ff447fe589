"""`python -m training add-probe`: publish a version again with model.pt's answers on fixed inputs
(probe.npz, shared.probe), for an artifact exported before export-onnx recorded them.

The service checks a model.onnx against model.pt before it serves it. With a probe it reads
model.pt's answers from the artifact; without one it starts a process that imports torch and runs
model.pt, which is most of its start-up on a slow machine. The new version is the source byte for
byte (model.pt, every runtime file) plus probe.npz, with `derived_from` naming the source; it is a
candidate, promoted as any other (`training promote` runs model.pt on the probe's inputs again
and refuses a probe that does not hold its answers).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from shared.probe import PROBE_KEY, probe_inputs, write_probe
from shared.store import (
    derived_metadata,
    new_version_name,
    publish_artifact,
    verify_artifact,
)
from training import cli

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "add-probe",
        "Publish a model again with model.pt's answers on fixed inputs (not promoted).",
    )
    cli.add_republish_flags(parser)
    cli.add_flag(parser, "--threads", default=0)
    return parser


def add_probe_main(args: argparse.Namespace) -> dict[str, Any]:
    """Record, publish; the summary. Raises the errors of verify_artifact / publish_artifact."""
    from training.engine import configure_threads
    from training.export_onnx import model_pt_answers, probe_entry

    configure_threads(args.threads)
    info = verify_artifact(args.model_dir, args.task, args.version)
    inputs = probe_inputs(info.manifest.input.shape)
    answers = model_pt_answers(info, inputs)
    output_dir = Path(args.output_model_dir or args.model_dir)
    version = args.new_version or new_version_name()
    metadata = derived_metadata(
        info, "adds model.pt's answers on fixed inputs for the check at load (probe.npz)"
    )
    metadata[PROBE_KEY] = probe_entry(len(inputs))
    with tempfile.TemporaryDirectory(prefix="add-probe-") as tmp:
        probe_file = Path(tmp) / "probe.npz"
        write_probe(probe_file, inputs, answers)
        publish_artifact(
            output_dir, info.task, version, info.model_path, metadata,
            runtime_files=info.runtime_files, probe_file=probe_file,
        )  # fmt: skip
    published = verify_artifact(output_dir, info.task, version)
    log.info("published %s %s with model.pt's probe to %s (a candidate: promote it to serve)",
             info.task, version, published.path)  # fmt: skip
    return {
        "task": info.task,
        "version": version,
        "path": str(published.path),
        "derived_from": {"version": info.version, "sha256": info.sha256},
        "promote": f"python -m training promote {info.task} {version} --model-dir {output_dir}",
    }


def main(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    summary = add_probe_main(args)
    print(json.dumps(summary, indent=2))
    return 0
