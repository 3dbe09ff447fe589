"""`python -m training drift-reference`: a published model again, with the reference distributions
of what it sees and says on its training sites (shared.drift), for the service's drift gauges.

    python -m training drift-reference --model-dir models --task diagnosis --version V \
        --data-path D1 [D2 ...] [--output-model-dir M] [--new-version N] [--limit N] \
        [--json PATH] [--threads T]

Each data folder is a site (training.sites.site_name: `bus-bra` for a folder with BUS-BRA's
table, else the folder's name). Every image is decoded, preprocessed, run and post-processed as
the service answers it (shared.inference: the decoding, preprocessing, calibration, frame map
and OOD detector; model.onnx in ONNX Runtime when the artifact carries a validated one, as the
service would, else model.pt), and its quantities are binned per site: each class's calibrated
probability, the OOD score, the served lesion area fraction (0 when the label is normal, as
/diagnose answers) and the frame's width and height.

A published version never changes, so the reference is not added to it: a NEW version is
published (model.pt and model.onnx byte for byte, the source manifest with `derived_from` and the
`drift_reference` field), whose manifest is verified with its files like any other; promote it
(`python -m training promote`) to serve it. `--json` also writes the reference to a file.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.drift import (
    HEIGHT,
    LESION_AREA,
    MANIFEST_FIELD,
    OOD_SCORE,
    WIDTH,
    DriftReference,
    probability_quantity,
)
from shared.inference import InferenceModel, load_artifact, predict
from shared.postprocessing import lesion_geometry
from shared.quality import DEFAULT_DETECTOR_FILE, feature_quality, load_detector
from shared.store import (
    ArtifactInfo,
    derived_metadata,
    new_version_name,
    publish_artifact,
    verify_artifact,
)
from training import cli

log = logging.getLogger(__name__)


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "drift-reference",
        "Publish a model again with the drift reference of its training sites (not promoted).",
    )
    cli.add_republish_flags(parser)
    cli.add_flag(
        parser, "--data-path", required=True, nargs="+",
        help="one folder per training site (BUS-BRA's with bus_data.csv)",
    )  # fmt: skip
    parser.add_argument(
        "--limit", type=int, default=0, help="at most N images per site, spread (default: all)"
    )
    parser.add_argument(
        "--detector-file", type=Path, default=DEFAULT_DETECTOR_FILE,
        help="the OOD detector the service uses (OOD_DETECTOR_FILE; default: the bundled one)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward (16)")
    cli.add_flag(parser, "--threads", default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the reference here")
    return parser


def site_values(
    info: ArtifactInfo,
    model: InferenceModel,
    images: Sequence[Any],
    batch_size: int,
    detector: Any,
    load: Callable[[Any], np.ndarray] = lambda image: image,
) -> dict[str, list[float]]:
    """{quantity: values} of `images` answered as the service answers them (shared.inference:
    /diagnose segments only frames labelled a lesion); `load` turns an item of `images` into its
    (H, W) uint8 frame, a batch at a time (a site is never held decoded)."""
    manifest = info.manifest
    names = manifest.class_names if manifest.output.classes else ()
    values: dict[str, list[float]] = {q: [] for q in (OOD_SCORE, WIDTH, HEIGHT, LESION_AREA)}
    for name in names:
        values[probability_quantity(name)] = []
    for start in range(0, len(images), batch_size):
        chunk = [load(image) for image in images[start : start + batch_size]]
        found = predict(model, chunk, batch_size, segment="lesion")
        for pixels, finding in zip(chunk, found, strict=True):
            height, width = pixels.shape
            values[WIDTH].append(float(width))
            values[HEIGHT].append(float(height))
            if finding.quality is not None:
                # a graph that computes the quality check on its own features: the service
                # answers with that score, so the reference does
                values[OOD_SCORE].append(float(feature_quality(finding.quality).score))
            else:
                values[OOD_SCORE].append(float(detector.assess(pixels).score))
            if finding.probabilities is not None:
                for name, p in zip(names, finding.probabilities, strict=True):
                    values[probability_quantity(name)].append(float(p))
            if manifest.output.mask is not None:
                area = 0.0  # /diagnose does not segment a frame labelled normal
                if finding.mask is not None:
                    area = lesion_geometry(finding.mask).area_fraction
                values[LESION_AREA].append(float(area))
    return values


def with_reference(info: ArtifactInfo, reference: dict[str, Any]) -> dict[str, Any]:
    """The source's manifest for its new version, carrying `reference`."""
    metadata = derived_metadata(info, "adds the drift reference of its training sites")
    metadata[MANIFEST_FIELD] = reference
    return metadata


def drift_reference_main(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Score the sites, bin, publish; the summary. Raises the errors of verify_artifact /
    publish_artifact and FileNotFoundError for a folder without images."""
    from training.data import data_fingerprint, load_image, scan_dataset
    from training.engine import configure_threads
    from training.export_onnx import spread
    from training.sites import site_name

    threads = configure_threads(args.threads)
    info = verify_artifact(args.model_dir, args.task, args.version)
    model = load_artifact(info, threads=threads)
    runtime = model.runtime
    detector = load_detector(args.detector_file)
    started = time.perf_counter()
    per_site: dict[str, dict[str, list[float]]] = {}
    fingerprints: dict[str, Any] = {}
    n_images = 0
    for root in args.data_path:
        site = site_name(root)
        if site in per_site:
            raise ValueError(f"two data folders are the site {site}")
        samples = scan_dataset(root)
        picked = [samples[i] for i in spread(len(samples), args.limit)]
        per_site[site] = site_values(
            info, model, picked, args.batch_size, detector, load=load_image
        )
        fingerprints[site] = {**data_fingerprint(samples), "scored": len(picked)}
        n_images += len(picked)
        log.info("site %s: %d images scored (%.0f s so far)", site, len(picked),
                 time.perf_counter() - started)  # fmt: skip
    seconds = time.perf_counter() - started
    reference = DriftReference.from_values(info.manifest.class_names, per_site)
    document = reference.to_dict({
        "command": command,
        "runtime": runtime,
        "model_sha256": info.sha256,
        "detector": args.detector_file.name,
        "data_fingerprints": fingerprints,
        "seconds": round(seconds, 1),
        "threads": threads,
    })  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    output_dir = args.output_model_dir or args.model_dir
    version = args.new_version or new_version_name()
    # every runtime file the source carries (model.onnx, classify.onnx, ...) and its probe, byte
    # for byte
    publish_artifact(
        Path(output_dir), info.task, version, info.model_path, with_reference(info, document),
        runtime_files=info.runtime_files, probe_file=info.probe_path,
    )  # fmt: skip
    published = verify_artifact(Path(output_dir), info.task, version)
    log.info("published %s %s with its drift reference to %s (%d images in %.0f s; a "
             "candidate: promote it to serve)", info.task, version, published.path, n_images,
             seconds)  # fmt: skip
    return {
        "task": info.task,
        "version": version,
        "path": str(published.path),
        "derived_from": {"version": info.version, "sha256": info.sha256},
        "sites": {s: b["n_images"] for s, b in reference.sites.items()},
        "runtime": runtime,
        "seconds": round(seconds, 1),
        "promote": f"python -m training promote {info.task} {version} --model-dir {output_dir}",
    }


def main(argv: list[str]) -> int:
    import shlex

    args = get_args_parser().parse_args(argv)
    command = shlex.join(["python", "-m", "training", "drift-reference", *argv])
    summary = drift_reference_main(args, command)
    print(json.dumps(summary, indent=2))
    return 0
