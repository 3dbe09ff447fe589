"""Reduced precision and graph variants of the joint model, judged on out-of-fold figures.

For each of the 5 cross-validation fold models (training/reports/cv/<preset>/fold<k>.pt, the
weights behind oof.json), exports the served form (flip averaging, TorchScript, as `python -m
training fit` publishes it), derives each variant from it and scores the fold's held-out images
with each: accuracy, macro AUC and lesion Dice pooled over all 623 images, exactly as the CV
report computes them (training.metrics.diagnosis_figures). Then times each variant's batch-1
forward on fold 0, at 1 thread and at all usable CPUs, alternated in rounds.

A variant may ship only when its figures stay within 0.5 points of accuracy, 0.005 macro AUC
and 0.005 lesion Dice of fp32 and its forward is clearly faster (p50 at most 0.9 x fp32's, at
the better thread count of each).

    .venv/bin/python bench/precision.py --data-path ../shared/data/busi
    .venv/bin/python bench/precision.py --data-path D --variants fp32 frozen --output-dir out/

Variants: fp32 (the TorchScript as exported), frozen (torch.jit.freeze +
optimize_for_inference: the same fp32 arithmetic, convolutions prepacked for oneDNN), bf16
(torch.autocast bfloat16 on the TorchScript), frozen-bf16, channels-last (weights and input in
NHWC), int8-dynamic (torch.ao dynamic quantisation: the Linear layers), int8-static (FX graph
mode post-training quantisation, x86 backend, calibrated on 64 training images of the fold),
onnxruntime (the same model exported to ONNX, CPU execution provider), onnxruntime-int8 (that
ONNX file statically quantised by ONNX Runtime: QDQ, uint8 activations, per-channel int8
weights, calibrated on the same 64 training images, the input and the stem convolution left in
fp32; --int8-fp32-nodes names others). A variant that cannot be built within --build-timeout
seconds, or not at all, is reported with the reason. ONNX Runtime variants get one session per
timed thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import re
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.settings import available_cpus  # noqa: E402
from shared.models.joint import JointFlipAverage  # noqa: E402
from training.export_onnx import OnnxRuntimeForward, export_onnx, score  # noqa: E402

log = logging.getLogger("precision")

VARIANTS = (
    "fp32",
    "frozen",
    "bf16",
    "frozen-bf16",
    "channels-last",
    "int8-dynamic",
    "int8-static",
    "onnxruntime",
    "onnxruntime-int8",
)
# The bar for shipping a variant.
MAX_ACCURACY_DROP = 0.005
MAX_AUC_DROP = 0.005
MAX_DICE_DROP = 0.005
MIN_SPEEDUP = 1 / 0.9
# Nodes of the exported ONNX graph onnxruntime-int8 leaves in fp32: the batch of the image and its
# mirror (/Concat) and the stem convolution, i.e. the input is never rounded to 8 bits. This
# model reacts to that rounding alone (the resized image loses its sub-level values) about as
# much as to the whole network's quantisation: on fold 0's training images, rounding the input
# to 256 levels in fp32 moved the class logits by 0.23 on average, the int8 graph with the input
# kept fp32 by 0.07.
ORT_INT8_FP32_NODES = re.compile(r"^/Concat$|/conv_stem/")
CALIBRATION_BATCH = 8

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, required=True, help="folder in BUSI layout")
    parser.add_argument("--preset", default="joint-lite0", help="recipe (default: joint-lite0)")
    parser.add_argument(
        "--cv-dir", type=Path, default=None, help="fold<k>.pt folder (default: its CV report's)"
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch (default: 8)")
    parser.add_argument(
        "--limit", type=int, default=0, help="score only the first N images per fold (smoke runs)"
    )
    parser.add_argument(
        "--build-timeout",
        type=int,
        default=600,
        help="seconds a variant may take to build for one fold before it is reported as not "
        "built (default: 600)",
    )
    parser.add_argument(
        "--int8-fp32-nodes",
        type=re.compile,
        default=ORT_INT8_FP32_NODES,
        help="regex of the ONNX node names onnxruntime-int8 leaves in fp32 "
        f"(default: {ORT_INT8_FP32_NODES.pattern!r}, the input and the stem convolution)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (default: 5)")
    parser.add_argument("--forwards", type=int, default=10, help="forwards per round (default: 10)")
    parser.add_argument(
        "--output-dir", type=Path, default=REPO / "bench" / "reports", help="default: bench/reports"
    )
    return parser


# --- variants -------------------------------------------------------------------------------


@dataclass
class Built:
    forward: Forward
    note: str = ""


def _autocast_bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def build_variant(
    name: str,
    eager: torch.nn.Module,
    scripted: torch.jit.ScriptModule,
    calibration: torch.Tensor,
    int8_fp32_nodes: re.Pattern[str] = ORT_INT8_FP32_NODES,
) -> Built:
    """The forward of variant `name`. Raises whatever building it raises (reported as such)."""
    if name == "fp32":
        return Built(scripted)
    if name in ("frozen", "frozen-bf16"):
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
        if name == "frozen":
            return Built(frozen)
        return Built(_under(frozen, _autocast_bf16))
    if name == "bf16":
        return Built(_under(scripted, _autocast_bf16))
    if name == "channels-last":
        module = scripted.to(memory_format=torch.channels_last)
        return Built(lambda x: module(x.contiguous(memory_format=torch.channels_last)))
    if name == "int8-dynamic":
        quantised = torch.ao.quantization.quantize_dynamic(
            eager.eval(), {torch.nn.Linear}, dtype=torch.qint8
        )
        return Built(quantised, "Linear layers only (the class head); the convolutions stay fp32")
    if name == "int8-static":
        return Built(
            _int8_static(copy.deepcopy(eager), calibration),
            "torch.ao FX graph mode, x86 qconfig mapping (every layer, the input included)",
        )
    if name == "onnxruntime":
        return _onnxruntime(eager, calibration[:1])
    if name == "onnxruntime-int8":
        return _onnxruntime_int8(eager, calibration, int8_fp32_nodes)
    raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")


def _under(module: Forward, context: Callable[[], contextlib.AbstractContextManager]) -> Forward:
    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with context():
            classes, masks = module(x)
        return classes.float(), masks.float()

    return forward


def _int8_static(eager: torch.nn.Module, calibration: torch.Tensor) -> Forward:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = get_default_qconfig_mapping("x86")
    prepared = prepare_fx(eager.eval(), mapping, example_inputs=(calibration[:1],))
    with torch.inference_mode():
        for start in range(0, len(calibration), CALIBRATION_BATCH):
            prepared(calibration[start : start + CALIBRATION_BATCH])
    return convert_fx(prepared)


def _onnxruntime(eager: torch.nn.Module, example: torch.Tensor) -> Built:
    forward = OnnxRuntimeForward(export_onnx(eager, example))  # pip install -e ".[train]"
    return Built(forward, f"onnxruntime {forward.version}, CPUExecutionProvider")


def _onnxruntime_int8(
    eager: torch.nn.Module, calibration: torch.Tensor, fp32_nodes: re.Pattern[str]
) -> Built:
    """The fold model in ONNX, quantised statically by ONNX Runtime: QDQ, per-channel int8
    weights, uint8 activations (U8S8, the x86 VNNI path), MinMax ranges over `calibration`
    (training images of the fold) in batches as scored, the nodes `fp32_nodes` matches left in
    fp32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {"x": calibration[start : start + CALIBRATION_BATCH].numpy()}
                for start in range(0, len(calibration), CALIBRATION_BATCH)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        fp32, prepared, quantised = (Path(tmp) / f for f in ("fp32.onnx", "pre.onnx", "q.onnx"))
        fp32.write_bytes(export_onnx(eager, calibration[:1]))
        quant_pre_process(str(fp32), str(prepared))  # shape inference, constant folding
        names = [node.name for node in onnx.load(str(prepared)).graph.node]
        excluded = [n for n in names if fp32_nodes.search(n)]
        if fp32_nodes.pattern and not excluded:
            raise RuntimeError(f"no ONNX node matches {fp32_nodes.pattern!r}")
        quantize_static(
            str(prepared),
            str(quantised),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=excluded,
        )
        forward = OnnxRuntimeForward(quantised.read_bytes())
    return Built(
        forward,
        f"onnxruntime {forward.version}, CPUExecutionProvider; quantize_static QDQ, "
        f"per-channel QInt8 weights, QUInt8 activations, MinMax on {len(calibration)} training "
        f"images of the fold; left in fp32: {', '.join(excluded) or 'nothing'}",
    )


@contextlib.contextmanager
def time_limit(seconds: int) -> Any:
    """Raise TimeoutError in the main thread after `seconds` (SIGALRM; checked between Python
    bytecodes, so a single long native call overruns until it returns)."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"not built within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- timing ---------------------------------------------------------------------------------


def time_forward(forwards: dict[str, Forward], example: torch.Tensor, rounds: int, n: int) -> dict:
    """p50 ms of batch-1 forwards per variant and thread count: the median over rounds, the
    variants and thread counts alternated within each round."""
    settings = sorted({1, available_cpus()})
    per: dict[str, dict[int, list[float]]] = {v: {t: [] for t in settings} for v in forwards}
    for _ in range(rounds):
        for threads in settings:
            torch.set_num_threads(threads)
            for name, forward in forwards.items():
                with torch.inference_mode():
                    for _ in range(3):
                        forward(example)
                    latencies = []
                    for _ in range(n):
                        started = time.perf_counter()
                        forward(example)
                        latencies.append(time.perf_counter() - started)
                per[name][threads].append(1000 * statistics.median(latencies))
    torch.set_num_threads(max(settings))
    out = {}
    for name, by_threads in per.items():
        p50 = {t: statistics.median(v) for t, v in by_threads.items()}
        best = min(p50, key=p50.__getitem__)
        out[name] = {
            "p50_ms_by_threads": {str(t): round(v, 1) for t, v in p50.items()},
            "best_threads": best,
            "best_p50_ms": round(p50[best], 1),
        }
    return out


# --- the run --------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    from training.data import DEFAULT_FOLDS_FILE, load_folds, load_split_images, scan_dataset
    from training.export import export_torchscript
    from training.joint import build_model, get_preset, preprocessing_for
    from training.metrics import diagnosis_figures

    torch.set_flush_denormal(True)
    preset = get_preset(args.preset)
    cv_dir = args.cv_dir or REPO / "training" / "reports" / "cv" / args.preset
    samples = scan_dataset(args.data_path)
    folds = load_folds(DEFAULT_FOLDS_FILE, samples)
    data = load_split_images(samples)
    preprocessing = preprocessing_for(preset)
    size = preset.size
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    notes: dict[str, str] = {}
    failed: dict[str, str] = {}
    timed: dict[str, Forward] = {}
    example = None
    for weights in sorted(cv_dir.glob("fold*.pt")):
        fold = int(weights.stem.removeprefix("fold"))
        model = build_model(preset, pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        eager = JointFlipAverage(model) if preset.flip_tta else model
        eager.eval()
        scripted = export_torchscript(eager, torch.zeros((1, 3, size, size)))
        held_out = [i for i, s in enumerate(samples) if folds[s.key]["fold"] == fold]
        held_out = held_out[: args.limit] if args.limit else held_out
        trained_on = [i for i, s in enumerate(samples) if folds[s.key]["fold"] != fold]
        calibration = torch.from_numpy(np.stack([
            preprocessing(data.images[i]) for i in trained_on[:: max(1, len(trained_on) // 64)]
        ][:64]))  # fmt: skip
        if example is None:
            example = torch.from_numpy(preprocessing(data.images[held_out[0]])[None])
        for name in args.variants:
            if name in failed:
                continue
            try:
                started = time.perf_counter()
                with time_limit(args.build_timeout):
                    built = build_variant(name, eager, scripted, calibration, args.int8_fp32_nodes)
                log.info("fold %d %s: built in %.0f s", fold, name, time.perf_counter() - started)
            except Exception as exc:  # a variant this model or platform does not support
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.warning("variant %s: %s", name, failed[name])
                rows.pop(name, None)
                continue
            notes[name] = built.note
            started = time.perf_counter()
            rows[name] += score(
                built.forward, preprocessing,
                [data.images[i] for i in held_out], [data.masks[i] for i in held_out],
                [samples[i].label for i in held_out], [samples[i].key for i in held_out],
                args.batch_size, preset.threshold,
            )  # fmt: skip
            log.info("fold %d %s: %d images in %.0f s", fold, name, len(held_out),
                     time.perf_counter() - started)  # fmt: skip
            if fold == 0:
                timed[name] = built.forward
    assert example is not None, f"no fold*.pt in {cv_dir}"
    figures = {name: diagnosis_figures(r) for name, r in rows.items()}
    timing = time_forward(timed, example, args.rounds, args.forwards)
    report = verdicts(figures, timing, notes, failed, len(rows["fp32"]))
    report["preset"] = args.preset
    report["cv_dir"] = str(cv_dir)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "precision.md").write_text(render(report) + "\n")
    print(render(report))
    return report


def verdicts(
    figures: dict[str, dict[str, float]],
    timing: dict[str, dict[str, Any]],
    notes: dict[str, str],
    failed: dict[str, str],
    n_images: int,
) -> dict[str, Any]:
    """Each variant's figures, deltas against fp32 and whether it may ship."""
    base, base_ms = figures["fp32"], timing["fp32"]["best_p50_ms"]
    variants = {}
    for name, fig in figures.items():
        delta = {k: fig[k] - base[k] for k in ("accuracy", "macro_auc", "lesion_dice")}
        holds = (
            delta["accuracy"] >= -MAX_ACCURACY_DROP
            and delta["macro_auc"] >= -MAX_AUC_DROP
            and delta["lesion_dice"] >= -MAX_DICE_DROP
        )
        speedup = base_ms / timing[name]["best_p50_ms"]
        variants[name] = {
            "accuracy": round(fig["accuracy"], 4),
            "macro_auc": round(fig["macro_auc"], 4),
            "lesion_dice": round(fig["lesion_dice"], 4),
            "delta": {k: round(v, 4) for k, v in delta.items()},
            **timing[name],
            "speedup": round(speedup, 2),
            "accuracy_holds": holds,
            "ships": name != "fp32" and holds and speedup >= MIN_SPEEDUP,
            "note": notes.get(name, ""),
        }
    return {"n_images": n_images, "variants": variants, "not_built": failed}


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# Precision and graph variants of {report['preset']}: out-of-fold figures and speed",
        "",
        f"Out-of-fold on all {report['n_images']} images (each scored by the fold model that "
        "did not train on it), against the same fold models in fp32 TorchScript as exported. "
        "Forward: batch 1 on fold 0's model, the better of 1 thread and all usable CPUs. Bar: "
        f"accuracy within {100 * MAX_ACCURACY_DROP:g} points, macro AUC within {MAX_AUC_DROP}, "
        f"lesion Dice within {MAX_DICE_DROP} of fp32, and p50 at most 0.9 x fp32's.",
        "",
        "| variant | accuracy | Δ | macro AUC | Δ | lesion Dice | Δ | p50 ms (threads) "
        "| speed-up | holds | ships |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for name, v in report["variants"].items():
        d = v["delta"]
        by_threads = ", ".join(f"{ms} @{t}" for t, ms in v["p50_ms_by_threads"].items())
        lines.append(
            f"| {name} | {v['accuracy']:.4f} | {d['accuracy']:+.4f} | {v['macro_auc']:.4f} "
            f"| {d['macro_auc']:+.4f} | {v['lesion_dice']:.4f} | {d['lesion_dice']:+.4f} "
            f"| {by_threads} | {v['speedup']:.2f}× | {'yes' if v['accuracy_holds'] else 'NO'} "
            f"| {'**yes**' if v['ships'] else 'no'} |"
        )
    notes = [f"- {n}: {v['note']}" for n, v in report["variants"].items() if v["note"]]
    failed = [f"- {n}: not built: {why}" for n, why in report["not_built"].items()]
    if notes or failed:
        lines += ["", *notes, *failed]
    return "\n".join(lines)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main(get_args_parser().parse_args())
