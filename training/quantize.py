"""`python -m training quantize-onnx`: int8 graphs of a diagnosis artifact, validated or refused.

    python -m training quantize-onnx --model-dir models --version V \
        --data-path ../shared/data/busi ../shared/data/bus-bra [--fold 0] \
        [--output-dir training/reports/int8/<version>]

The recipes (RECIPES), each fixed before any of its validation figures were seen (issue 20):

- ONNX Runtime static quantisation (`onnxruntime.quantization.quantize_static`) after its
  `quant_pre_process`, QDQ format, weights int8 per output channel, activations uint8, MinMax
  calibration;
- only the convolutions are quantised: the class head, the mask's resize, the flip average and
  the quality score on the pooled features stay fp32; `conv` quantises every convolution,
  `conv-fp32-stem-block0` (the default) leaves the stem and the first block in fp32, so the
  input is never rounded to 8 bits (bench/reports/precision.md);
- calibrated on 200 images spread over the images the artifact TRAINED on (the folds other than
  `--fold` of the site folds, both sites);
- validated on the images of `--fold`, which neither the weights nor the calibration saw, per
  site and pooled: accuracy, macro AUC (pooled), malignant AUC and lesion Dice of the int8 graph
  against the fp32 graph on the same images must lie within shared.variants.VALIDATION_BAR
  (0.5 points of accuracy, 0.005 AUC, 0.005 Dice), and the classify-only int8 graph must give
  the full int8 graph's label on every image.

The int8 graphs are written to `<output-dir>/` (not committed: rebuilt by the command) beside the
report (`report.md`, `report.json`), whose `holds` says whether the variant may serve. It
publishes nothing: an int8 variant serves only from an artifact whose validation holds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shared import inference
from shared.onnx_runtime import OnnxSessions
from shared.store import ArtifactInfo
from shared.variants import GRAPH_CLASSIFY, GRAPH_FULL, VALIDATION_BAR

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 200
_COMMON = {
    "tool": "onnxruntime.quantization.quantize_static after quant_pre_process",
    "format": "QDQ",
    "weights": "int8, per output channel",
    "activations": "uint8",
    "calibration_method": "MinMax",
    "quantised_ops": ["Conv"],
    "calibration_images": CALIBRATION_IMAGES,
    "calibration_set": "spread over the images the artifact trained on (folds other than --fold)",
}
RECIPES: dict[str, dict[str, Any]] = {
    # every convolution in int8: the first recipe, fixed before any figure (refused for
    # diagnosis 20261204T221149Z, training/reports/int8/20261204T221149Z/conv)
    "conv": {**_COMMON, "fp32_nodes": ""},
    # the input, the stem and the first block in fp32: the exclusion bench/reports/precision.md
    # found on the BUSI-only model and asked to be validated independently (its notes), taken
    # from there as it stands
    "conv-fp32-stem-block0": {**_COMMON, "fp32_nodes": r"/conv_stem/|/blocks\.0/"},
}
DEFAULT_RECIPE = "conv-fp32-stem-block0"
SITE_BAR = {"accuracy": 0.005, "malignant_auc": 0.005, "lesion_dice": 0.005}


def quantise(
    source: Path, target: Path, inputs: list[np.ndarray], recipe: str = DEFAULT_RECIPE
) -> list[str]:
    """`recipe` of RECIPES: `source` (fp32 ONNX) -> `target` (QDQ int8), calibrated on `inputs`
    (each a (1, C, S, S) float32 array as the graph takes it). Returns the nodes left fp32.
    Raises ValueError when the recipe names fp32 nodes the graph does not have."""
    import re

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {"x": x}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        pattern = RECIPES[recipe]["fp32_nodes"]
        names = [node.name for node in onnx.load(str(prepared)).graph.node]
        excluded = [n for n in names if pattern and re.search(pattern, n)]
        if pattern and not excluded:
            raise ValueError(f"no node of {source.name} matches {pattern!r}")
        quantize_static(
            str(prepared),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(RECIPES[recipe]["quantised_ops"]),
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=excluded,
        )
    return excluded


def _rows(
    graph: OnnxSessions,
    inputs: list[np.ndarray],
    layouts: list[Any],
    masks: list[np.ndarray],
    spec: inference.ModelSpec,
    threads: int,
) -> list[dict[str, Any]]:
    """Per-image rows of `graph` (a full or classify-only graph, fp32 or int8), answered as the
    service answers them (shared.inference), with the raw logits for the agreement figures."""
    from shared.postprocessing import dice_iou

    names = graph.output_names
    declared = ("classes", "masks") if len(names) > 1 and names[1] != "quality" else ("classes",)
    spec = replace(spec, outputs=inference.graph_output_names(declared, names))
    rows = []
    for x, layout, mask in zip(inputs, layouts, masks, strict=True):
        outputs = inference.split_outputs(spec.outputs, graph.run(x, threads))
        (found,) = inference.findings_of(spec, outputs, [layout])
        assert found.logits is not None and found.probabilities is not None
        row: dict[str, Any] = {
            "probs": [float(v) for v in found.probabilities],
            "logits": [float(v) for v in found.logits],
        }
        if found.quality is not None:
            row["quality"] = found.quality
        if found.mask is not None and outputs.masks is not None:
            pred = found.mask > 0
            row["dice"] = float(dice_iou(pred, mask > 127)[0])
            row["mask_pixels"] = int(pred.sum())
            row["mask_logits"] = np.asarray(outputs.masks[0], dtype=np.float32)
        rows.append(row)
    return rows


def _figures(rows: list[dict[str, Any]], labels: list[int]) -> dict[str, float]:
    """The sites report's figures (training.sites.site_figures) of these rows, less the
    undefined ones."""
    from training.sites import site_figures

    labelled = [{**r, "label": label} for r, label in zip(rows, labels, strict=True)]
    return {k: v for k, v in site_figures(labelled).items() if not np.isnan(v)}


def _bar_failures(reference: dict[str, float], variant: dict[str, float], bar: dict[str, float],
                  where: str) -> list[str]:  # fmt: skip
    failures = []
    for key, tolerance in bar.items():
        if key in reference and abs(variant[key] - reference[key]) > tolerance:
            failures.append(
                f"{where}: {key} {variant[key]:.4f} against fp32 {reference[key]:.4f} "
                f"(allowed {tolerance})"
            )
    return failures


def _median_ms(graph: OnnxSessions, x: np.ndarray, threads: int, runs: int) -> float:
    graph.run(x, threads)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        graph.run(x, threads)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def quantize_main(args: argparse.Namespace) -> dict[str, Any]:
    from shared.store import verify_artifact
    from training.data import load_split_images
    from training.export_onnx import spread
    from training.sites import load_site_folds, scan_sites

    info: ArtifactInfo = verify_artifact(Path(args.model_dir), "diagnosis", args.version)
    meta = info.metadata
    spec = inference.ModelSpec.from_manifest(info.manifest)
    preprocessing = spec.preprocessing
    samples = scan_sites(args.data_path)
    folds = load_site_folds(Path(args.split_file), samples)
    held = [i for i, s in enumerate(samples) if int(folds[s.key]["fold"]) == args.fold]
    trained = [i for i, s in enumerate(samples) if int(folds[s.key]["fold"]) != args.fold]
    calib_idx = [trained[i] for i in spread(len(trained), CALIBRATION_IMAGES)]
    output = Path(args.output_dir or f"training/reports/int8/{info.version}/{args.recipe}")
    output.mkdir(parents=True, exist_ok=True)

    def prepared(indices: list[int]) -> tuple[list[np.ndarray], list[Any], Any]:
        data = load_split_images([samples[i] for i in indices])
        frames = [inference.model_input(preprocessing, im) for im in data.images]
        return [x[None] for x, _ in frames], [layout for _, layout in frames], data

    calib_inputs, _, _ = prepared(calib_idx)
    graphs = {GRAPH_FULL: info.path / "model.onnx", GRAPH_CLASSIFY: info.path / "classify.onnx"}
    int8, fp32_nodes = {}, {}
    for graph, source in graphs.items():
        started = time.perf_counter()
        int8[graph] = output / f"{source.stem}.int8.onnx"
        fp32_nodes[graph] = quantise(source, int8[graph], calib_inputs, args.recipe)
        log.info("%s quantised in %.0f s", graph, time.perf_counter() - started)

    inputs, layouts, data = prepared(held)
    labels = [s.label for s in data.samples]
    sites = [s.site for s in data.samples]
    rows = {}
    for name, path in [
        ("fp32", graphs[GRAPH_FULL]),
        ("int8", int8[GRAPH_FULL]),
        ("int8_classify", int8[GRAPH_CLASSIFY]),
        ("fp32_classify", graphs[GRAPH_CLASSIFY]),
    ]:
        started = time.perf_counter()
        graph = OnnxSessions.from_file(path, (args.threads,))
        rows[name] = _rows(graph, inputs, layouts, data.masks, spec, args.threads)
        log.info("%s: %d images in %.0f s", name, len(inputs), time.perf_counter() - started)

    figures: dict[str, dict[str, dict[str, float]]] = {"pooled": {}}
    failures: list[str] = []
    for variant in ("fp32", "int8"):
        figures["pooled"][variant] = _figures(rows[variant], labels)
    failures += _bar_failures(figures["pooled"]["fp32"], figures["pooled"]["int8"],
                              dict(VALIDATION_BAR), "pooled")  # fmt: skip
    for site in sorted(set(sites)):
        pick = [i for i, s in enumerate(sites) if s == site]
        figures[site] = {
            v: _figures([rows[v][i] for i in pick], [labels[i] for i in pick])
            for v in ("fp32", "int8")
        }
        failures += _bar_failures(figures[site]["fp32"], figures[site]["int8"], SITE_BAR, site)
    int8_labels = [int(np.argmax(r["probs"])) for r in rows["int8"]]
    classify_labels = [int(np.argmax(r["probs"])) for r in rows["int8_classify"]]
    fp32_labels = [int(np.argmax(r["probs"])) for r in rows["fp32"]]
    classify_differs = sum(a != b for a, b in zip(int8_labels, classify_labels, strict=True))
    if classify_differs:
        failures.append(f"classify.int8 gives another label than model.int8 on {classify_differs}")
    quality_threshold = float((meta.get("quality") or {}).get("threshold", float("nan")))
    agreement = {
        "labels_changed_by_int8": sum(
            a != b for a, b in zip(fp32_labels, int8_labels, strict=True)
        ),
        "classify_int8_vs_full_int8_label_differences": classify_differs,
        "max_abs_class_logit_diff": max(
            float(np.abs(np.subtract(a["logits"], b["logits"])).max())
            for a, b in zip(rows["fp32"], rows["int8"], strict=True)
        ),
        "max_abs_mask_logit_diff": max(
            float(np.abs(a["mask_logits"] - b["mask_logits"]).max())
            for a, b in zip(rows["fp32"], rows["int8"], strict=True)
        ),
    }
    if not np.isnan(quality_threshold) and "quality" in rows["fp32"][0]:
        for variant in ("fp32", "int8"):
            agreement[f"flagged_{variant}"] = sum(
                r["quality"] > quality_threshold for r in rows[variant]
            )
    x = inputs[0]
    timing = {}
    for name, path in [("fp32", graphs[GRAPH_FULL]), ("int8", int8[GRAPH_FULL]),
                       ("fp32_classify", graphs[GRAPH_CLASSIFY]),
                       ("int8_classify", int8[GRAPH_CLASSIFY])]:  # fmt: skip
        timing[name] = _median_ms(OnnxSessions.from_file(path, (args.threads,)), x,
                                  args.threads, args.timing_runs)  # fmt: skip
    report = {
        "artifact": {"task": "diagnosis", "version": info.version},
        "recipe": {"name": args.recipe, **RECIPES[args.recipe], "left_fp32": fp32_nodes},
        "validated_on": f"fold {args.fold} of {_relative(args.split_file)}: {len(held)} images "
        "(neither trained on nor used for calibration)",
        "bar": {"pooled": dict(VALIDATION_BAR), "per_site": SITE_BAR},
        "figures": figures,
        "agreement": agreement,
        "holds": not failures,
        "failures": failures,
        "bare_forward_ms_median_batch1": timing,
        "timing_note": f"{args.timing_runs} runs each at {args.threads} threads, load average "
        f"{os.getloadavg()[0]:.1f} at the end: indicative only; bench/ measures speed",
        "sizes_bytes": {
            **{f"fp32_{g}": p.stat().st_size for g, p in graphs.items()},
            **{f"int8_{g}": p.stat().st_size for g, p in int8.items()},
        },
        "command": args.command_line,
    }
    (output / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "report.md").write_text(render(report))
    return report


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# int8 for diagnosis {report['artifact']['version']}: "
        + ("holds" if report["holds"] else "refused"),
        "",
        f"Validated on {report['validated_on']}. Recipe (fixed before the figures): "
        + "; ".join(f"{k} {v}" for k, v in report["recipe"].items())
        + ".",
        "",
        "| images | figure | fp32 | int8 | int8 - fp32 |",
        "|---|---|---|---|---|",
    ]
    for where, pair in report["figures"].items():
        for key in ("accuracy", "macro_auc", "malignant_auc", "lesion_dice"):
            if key in pair["fp32"]:
                a, b = pair["fp32"][key], pair["int8"][key]
                lines.append(f"| {where} ({int(pair['fp32']['n'])}) | {key} | {a:.4f} | "
                             f"{b:.4f} | {b - a:+.4f} |")  # fmt: skip
    lines += ["", "Agreement: " + ", ".join(f"{k} {v}" for k, v in report["agreement"].items())]
    lines += ["", "Failures: " + ("; ".join(report["failures"]) or "none")]
    lines += [
        "",
        "Bare forward, batch 1, median ms ("
        + report["timing_note"]
        + "): "
        + ", ".join(f"{k} {v:.1f}" for k, v in report["bare_forward_ms_median_batch1"].items()),
        "",
        f"`{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    from training import cli
    from training.sites import DEFAULT_SITE_FOLDS

    parser = argparse.ArgumentParser(
        prog="python -m training quantize-onnx",
        description="int8 graphs of a diagnosis artifact, validated against its fp32 graphs",
    )
    parser.add_argument("--model-dir", type=Path, default=Path("models"))
    parser.add_argument("--version", required=True, help="the diagnosis version to quantise")
    parser.add_argument("--data-path", type=Path, nargs="+", required=True,
                        help="the sites' folders (BUSI, BUS-BRA)")  # fmt: skip
    parser.add_argument("--split-file", type=Path, default=DEFAULT_SITE_FOLDS)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=DEFAULT_RECIPE,
                        help=f"quantisation recipe (default: {DEFAULT_RECIPE})")  # fmt: skip
    parser.add_argument("--fold", type=int, default=0, help="the fold the artifact held out")
    parser.add_argument("--output-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-runs", type=int, default=30)
    args = parser.parse_args(argv)
    args.command_line = cli.command_line("quantize-onnx", argv)
    return args


def main(argv: list[str]) -> int:
    report = quantize_main(parse_args(argv))
    print(render(report))
    return 0 if report["holds"] else 1
