"""Runtime variants: the same model in a runtime other than TorchScript, shipped beside model.pt.

An artifact may carry, besides model.pt, one file per (runtime, graph, precision): model.onnx
(the whole network for ONNX Runtime), classify.onnx (only what a label needs), model.int8.onnx,
... Each is listed in the manifest's `runtimes` (shared.manifest.Manifest.runtimes) with its
sha256 and the figures of its validation against model.pt on the same images; it serves only
when those figures lie within VALIDATION_BAR and its logits within RUNTIME_AGREEMENT_ATOL of
model.pt's (shared.warmup). shared.store copies and verifies the files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RUNTIME_ONNX = "onnxruntime"
ONNX_FILE = "model.onnx"
RUNTIME_FILES = {RUNTIME_ONNX: ONNX_FILE}
"""Runtimes other than TorchScript an artifact may carry a file for, and its full graph's name."""

GRAPH_FULL = "full"
GRAPH_CLASSIFY = "classify"
GRAPHS = (GRAPH_FULL, GRAPH_CLASSIFY)
"""What a runtime file computes: the whole network (`full`: every output of model.pt) or only
what a label needs (`classify`: the encoder and the class head, no mask decoder)."""
PRECISIONS = ("fp32", "int8")

_GRAPH_STEMS = {GRAPH_FULL: "model", GRAPH_CLASSIFY: "classify"}


def runtime_file_name(runtime: str, graph: str = GRAPH_FULL, precision: str = "fp32") -> str:
    """The file a runtime variant ships in: model.onnx, classify.onnx, model.int8.onnx, ...

    Raises ValueError for an unknown runtime, graph or precision.
    """
    if runtime not in RUNTIME_FILES or graph not in GRAPHS or precision not in PRECISIONS:
        raise ValueError(f"no runtime file for {runtime!r} / {graph!r} / {precision!r}")
    suffix = RUNTIME_FILES[runtime].rsplit(".", 1)[1]
    middle = "" if precision == "fp32" else f".{precision}"
    return f"{_GRAPH_STEMS[graph]}{middle}.{suffix}"


RUNTIME_FILE_NAMES = frozenset(
    runtime_file_name(r, g, p) for r in RUNTIME_FILES for g in GRAPHS for p in PRECISIONS
)

VALIDATION_BAR = {"accuracy": 0.005, "macro_auc": 0.005, "lesion_dice": 0.005}
"""How far a runtime variant's figures may lie from the TorchScript fp32 model's on the same
images (absolute difference) for the variant to serve: 0.5 points of accuracy, 0.005 macro AUC,
0.005 lesion Dice (issue 10)."""

RUNTIME_AGREEMENT_ATOL = 1e-2
"""How far a runtime variant's logits may lie from model.pt's on the same input (fp32 reordering
gives ~1e-4 on the shipped model, up to 2e-3 on its mask logits of magnitude ~10; a logit 0.01
off moves a probability by at most 0.0025). The export refuses a file beyond it, and so does the
service at load."""


@dataclass(frozen=True)
class RuntimeVariant:
    """The same model in another runtime, shipped beside model.pt and validated against it.

    JSON (one entry of the manifest's `runtimes` list):

        {"runtime": "onnxruntime", "file": "model.onnx", "sha256": "<hex>", "precision": "fp32",
         "validation": {"source": "...", "command": "...", "n_images": 623,
                        "reference": {"accuracy": .., "macro_auc": .., "lesion_dice": ..},
                        "variant": {"accuracy": .., "macro_auc": .., "lesion_dice": ..},
                        ...}}

    `reference` holds the TorchScript fp32 figures and `variant` this runtime's, on the same
    images (out-of-fold where the job had folds); figures a task has no use for are left out.
    The variant serves only when it `holds`: every figure it shares with `reference` lies within
    VALIDATION_BAR (and it shares at least one).
    """

    runtime: str
    file: str
    sha256: str
    precision: str = "fp32"
    validation: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    graph: str = GRAPH_FULL
    outputs: tuple[str, ...] = ()  # the graph's output names in order; () when not recorded

    @property
    def deltas(self) -> dict[str, float]:
        """variant - reference for each figure of VALIDATION_BAR both record."""
        reference = self.validation.get("reference") or {}
        variant = self.validation.get("variant") or {}
        return {
            key: float(variant[key]) - float(reference[key])
            for key in VALIDATION_BAR
            if _is_number(reference.get(key)) and _is_number(variant.get(key))
        }

    @property
    def holds(self) -> bool:
        deltas = self.deltas
        return bool(deltas) and all(abs(d) <= VALIDATION_BAR[k] + 1e-12 for k, d in deltas.items())

    def to_dict(self) -> dict[str, Any]:
        data = {
            **self.extra,
            "runtime": self.runtime,
            "file": self.file,
            "sha256": self.sha256,
            "precision": self.precision,
            "validation": dict(self.validation),
        }
        if self.graph != GRAPH_FULL:
            data["graph"] = self.graph
        if self.outputs:
            data["outputs"] = list(self.outputs)
        return data


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_runtime_variants(value: object, problems: list[str]) -> tuple[RuntimeVariant, ...]:
    """The variants of a manifest's `runtimes` list; each invalid field is appended to
    `problems` (and its entry left out)."""
    if not isinstance(value, list):
        problems.append("runtimes must be a list")
        return ()
    variants = []
    for i, entry in enumerate(value):
        where = f"runtimes[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object")
            continue
        runtime, file = entry.get("runtime"), entry.get("file")
        sha, precision = entry.get("sha256"), entry.get("precision", "fp32")
        graph, outputs = entry.get("graph", GRAPH_FULL), entry.get("outputs", [])
        validation = entry.get("validation", {})
        bad = len(problems)
        if runtime not in RUNTIME_FILES:
            problems.append(f"{where}.runtime must be one of {list(RUNTIME_FILES)}")
        if graph not in GRAPHS:
            problems.append(f"{where}.graph must be one of {list(GRAPHS)}")
        if precision not in PRECISIONS:
            problems.append(f"{where}.precision must be one of {list(PRECISIONS)}")
        expected = runtime_file_name(runtime, graph, precision) if len(problems) == bad else file
        if file != expected:
            problems.append(f"{where}.file must be {expected!r}")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            problems.append(f"{where}.sha256 must be 64 lower-case hex digits")
        if not isinstance(validation, dict):
            problems.append(f"{where}.validation must be an object")
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            problems.append(f"{where}.outputs must be a list of names")
        if (runtime, graph, precision) in {(v.runtime, v.graph, v.precision) for v in variants}:
            problems.append(f"{where}: {runtime!r} {graph} {precision} listed twice")
        if len(problems) == bad:
            known = {"runtime", "file", "sha256", "precision", "validation", "graph", "outputs"}
            variants.append(RuntimeVariant(
                runtime, file, sha, precision, validation,
                {k: v for k, v in entry.items() if k not in known}, graph, tuple(outputs),
            ))  # fmt: skip
    return tuple(variants)
