"""Bare batch-1 forward time of every artifact in a model folder: the latency budget's yardstick.

Loads each served artifact exactly as the service does (verified, TorchScript, warmed up), then
times `module(batch)` under `torch.inference_mode()` with flush-denormal on, at 1 thread and at
all usable CPUs, alternating the two settings in rounds so that drift on a shared machine hits
both alike. Reports the median p50 over rounds per setting, and the best one. /diagnose on a
joint (diagnosis) artifact is that one forward; on a separate pair it is the sum of the two.

    .venv/bin/python bench/bench_forward.py                        # the embedded models/
    .venv/bin/python bench/bench_forward.py --model-dir DIR --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.registry import load_model  # noqa: E402
from service.settings import available_cpus  # noqa: E402
from shared.errors import ArtifactError  # noqa: E402
from shared.labels import TASKS  # noqa: E402
from shared.store import resolve_artifact  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models", help="default: models/")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per setting (default: 5)")
    parser.add_argument("--forwards", type=int, default=20, help="timed forwards per round")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser


def time_forwards(module, batch, n: int) -> float:
    """p50 in ms of n forwards."""
    import torch

    latencies = []
    with torch.inference_mode():
        for _ in range(n):
            started = time.perf_counter()
            module(batch)
            latencies.append(time.perf_counter() - started)
    return 1000.0 * statistics.median(latencies)


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_flush_denormal(True)
    settings = sorted({1, available_cpus()})
    figures: dict[str, dict[str, object]] = {}
    for task in TASKS:
        try:
            info = resolve_artifact(args.model_dir, task)
        except ArtifactError:
            continue
        model = load_model(info)
        rng = np.random.default_rng(0)
        frame = rng.integers(0, 256, size=(480, 640), dtype=np.uint8)
        batch = torch.from_numpy(model.preprocessing(frame)[None])
        per_setting: dict[int, list[float]] = {n: [] for n in settings}
        for _ in range(args.rounds):
            for threads in settings:
                torch.set_num_threads(threads)
                time_forwards(model.module, batch, 3)  # settle after the switch
                per_setting[threads].append(time_forwards(model.module, batch, args.forwards))
        p50 = {n: statistics.median(v) for n, v in per_setting.items()}
        best = min(p50, key=p50.__getitem__)
        figures[task] = {
            "version": info.version,
            "name": info.name,
            "input": list(model.input_shape),
            "p50_ms_by_threads": {str(n): round(v, 2) for n, v in p50.items()},
            "best_threads": best,
            "best_p50_ms": round(p50[best], 2),
        }
    if not figures:
        print(f"no loadable artifacts under {args.model_dir}", file=sys.stderr)
        return 1
    print("| task | artifact | input | " + " | ".join(f"p50 ms, {n} thr" for n in settings)
          + " | best |")  # fmt: skip
    print("|---|---|---|" + "---:|" * (len(settings) + 1))
    for task, fig in figures.items():
        cells = " | ".join(f"{fig['p50_ms_by_threads'][str(n)]:.1f}" for n in settings)
        print(f"| {task} | {fig['name']} {fig['version']} | {fig['input']} | {cells} "
              f"| {fig['best_p50_ms']:.1f} ({fig['best_threads']} thr) |")  # fmt: skip
    if "diagnosis" in figures:
        total = figures["diagnosis"]["best_p50_ms"]
        print(f"\n/diagnose forward total (one joint forward): {total:.1f} ms")
    elif {"classification", "segmentation"} <= set(figures):
        total = figures["classification"]["best_p50_ms"] + figures["segmentation"]["best_p50_ms"]
        print(f"\n/diagnose forward total (classifier + segmenter): {total:.1f} ms")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
