"""model.pt's answers on fixed inputs, recorded in the artifact (probe.npz) when its runtime
files are made, so that a runtime variant can be checked against model.pt where it loads without
loading model.pt there.

The service serving ONNX Runtime checks model.onnx against model.pt before it serves it. Without a
probe, model.pt's answers come from a short-lived process that imports torch and runs model.pt
(shared.onnx_runtime.torchscript_outputs): seconds of every start-up, most of it on a slow
machine. With one, the answers were computed by model.pt when `python -m training export-onnx`
made the graphs, the manifest holds the file's sha256 beside model.pt's (shared.store checks both),
and `python -m training promote` runs model.pt on the probe's inputs once more and refuses a probe
that does not hold its answers (shared.warmup). The probe carries its inputs, so a later change
to how inputs are made cannot make a recorded answer the answer to another question.

Manifest (top level):

    "probe": {"file": "probe.npz", "sha256": "<hex>", "batches": 2, "source": "..."}

probe.npz holds `x<i>` (the i-th input batch, float32 (N, C, H, W)) and `y<i>_<j>` (model.pt's
j-th output for it, float32). Read with allow_pickle off.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROBE_FILE = "probe.npz"
PROBE_KEY = "probe"
PROBE_BATCH = 2  # two images a batch: a batched forward is checked, not only a lone one


def probe_inputs(shape: Sequence[int]) -> list[np.ndarray]:
    """The inputs a probe records: a batch of zeros, and a fixed scan-like batch (not only zeros:
    a broken conversion can still map zeros right), each of PROBE_BATCH images of `shape`."""
    rng = np.random.default_rng(0)
    return [
        np.zeros((PROBE_BATCH, *shape), np.float32),
        rng.normal(0.0, 1.0, (PROBE_BATCH, *shape)).astype(np.float32),
    ]


@dataclass(frozen=True)
class Probe:
    """Input batches and model.pt's outputs for each (outputs[i][j]: output j of batch i)."""

    inputs: tuple[np.ndarray, ...]
    outputs: tuple[tuple[np.ndarray, ...], ...]


def write_probe(path: Path, inputs: Sequence[np.ndarray], outputs: Sequence[Sequence[Any]]) -> None:
    """Save `inputs` and model.pt's `outputs` for each as a probe file at `path`."""
    if len(inputs) != len(outputs) or not inputs:
        raise ValueError("a probe needs one list of outputs for each input batch")
    arrays: dict[str, np.ndarray] = {}
    for i, (batch, answers) in enumerate(zip(inputs, outputs, strict=True)):
        arrays[f"x{i}"] = np.ascontiguousarray(batch, np.float32)
        for j, answer in enumerate(answers):
            arrays[f"y{i}_{j}"] = np.ascontiguousarray(answer, np.float32)
    with Path(path).open("wb") as fh:
        np.savez(fh, **arrays)


def read_probe(path: Path) -> Probe:
    """The probe file at `path`. Raises ValueError when it is not one (pickled objects included:
    they are never loaded)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {name: saved[name] for name in saved.files}
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{Path(path).name} is not a probe file") from exc
    pattern = re.compile(r"x(\d+)|y(\d+)_(\d+)")
    batches = sorted(int(m[1]) for m in map(pattern.fullmatch, arrays) if m and m[1] is not None)
    if not batches or batches != list(range(len(batches))):
        raise ValueError(f"{Path(path).name} holds no numbered input batches")
    outputs = []
    for i in batches:
        count = sum(1 for name in arrays if name.startswith(f"y{i}_"))
        answers = tuple(arrays.get(f"y{i}_{j}") for j in range(count))
        if not answers or any(a is None for a in answers):
            raise ValueError(f"{Path(path).name} lacks outputs of batch {i}")
        outputs.append(answers)
    if any(m is None for m in map(pattern.fullmatch, arrays)):
        raise ValueError(f"{Path(path).name} holds arrays other than inputs and outputs")
    return Probe(tuple(arrays[f"x{i}"] for i in batches), tuple(outputs))  # type: ignore[arg-type]


def probe_record(metadata: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The manifest's probe entry, or None when the artifact records no probe. Raises ValueError
    for an entry that is not an object naming PROBE_FILE."""
    if PROBE_KEY not in metadata:
        return None
    entry = metadata[PROBE_KEY]
    if not isinstance(entry, Mapping) or entry.get("file") != PROBE_FILE:
        raise ValueError(f"the manifest's {PROBE_KEY} entry must be an object naming {PROBE_FILE}")
    return entry


def largest_difference(expected: Sequence[Any], actual: Sequence[Any]) -> float:
    """Largest absolute difference between `expected` and the first len(expected) of `actual`
    (a graph may add outputs after model.pt's: the quality score); inf when `actual` has fewer
    outputs or another shape."""
    if len(actual) < len(expected):
        return float("inf")
    worst = 0.0
    for e, a in zip(expected, actual[: len(expected)], strict=True):
        e, a = np.asarray(e, np.float32), np.asarray(a, np.float32)
        if e.shape != a.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(e - a), initial=0.0)))
    return worst
