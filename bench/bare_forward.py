"""The bare forward of an artifact's model file, as a new user would time it, driven over stdin.

A separate process from the service and from the load generator, one per runtime
(`--runtime`, default torchscript), one preprocessed batch-1 input per model:

- torchscript: plain `torch.jit.load`, `eval()`, `torch.inference_mode()`, flush-denormal on,
  `torch.set_num_threads(threads)`;
- onnxruntime: a plain `onnxruntime.InferenceSession(model.onnx, SessionOptions(
  intra_op_num_threads=threads, inter_op_num_threads=1), providers=["CPUExecutionProvider"])`
  and `session.run` (a session's thread pool is sized when it is made: one session per thread
  count; torch is not imported).

bench/bench_service.py starts it, then sends one JSON object per line and reads one back:

    {"model": "<path>", "threads": 2, "forwards": 20}  ->  {"latencies": [seconds, ...]}
    {"quit": true}

`model` is the artifact's model.pt or model.onnx; metadata.json beside it gives the
preprocessing. Nothing else runs in this process while the service is being measured: it blocks
on stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.decoding import decode_image  # noqa: E402
from shared.preprocessing import Preprocessing  # noqa: E402

RUNTIMES = ("torchscript", "onnxruntime")
_SETTLE = 3  # untimed forwards after a thread-count switch

Forward = Callable[[], object]


def preprocessed(model_path: Path, png: bytes) -> np.ndarray:
    """The batch-1 input its own manifest's preprocessing makes of `png`."""
    metadata = json.loads((model_path.parent / "metadata.json").read_text())
    preprocessing = Preprocessing.from_metadata(metadata["preprocessing"])
    return np.ascontiguousarray(preprocessing(decode_image(png).pixels)[None], dtype=np.float32)


class TorchScriptForwards:
    """One module per file; the thread count is torch's, set per command."""

    def __init__(self, png: bytes) -> None:
        import torch

        torch.set_flush_denormal(True)
        self.torch, self.png = torch, png
        self.loaded: dict[str, Forward] = {}
        self.threads_now = 0

    def forward(self, path: str, threads: int) -> Forward:
        torch = self.torch
        if path not in self.loaded:
            module = torch.jit.load(path, map_location="cpu").eval()
            batch = torch.from_numpy(preprocessed(Path(path), self.png))
            self.loaded[path] = lambda: module(batch)
            with torch.inference_mode():
                for _ in range(_SETTLE):  # the profiling executor specialises on the second call
                    self.loaded[path]()
        if threads != self.threads_now:
            self.threads_now = threads
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for _ in range(_SETTLE):
                    self.loaded[path]()
        return self.loaded[path]

    def timed(self, forward: Forward, forwards: int) -> list[float]:
        with self.torch.inference_mode():
            return timed(forward, forwards)


class OnnxRuntimeForwards:
    """One session per file and thread count, made (and settled) on first use."""

    def __init__(self, png: bytes) -> None:
        import onnxruntime

        self.ort, self.png = onnxruntime, png
        self.sessions: dict[tuple[str, int], Forward] = {}

    def forward(self, path: str, threads: int) -> Forward:
        if (path, threads) not in self.sessions:
            ort = self.ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: preprocessed(Path(path), self.png)}
            self.sessions[path, threads] = lambda: session.run(None, feed)
            for _ in range(_SETTLE):
                self.sessions[path, threads]()
        return self.sessions[path, threads]

    def timed(self, forward: Forward, forwards: int) -> list[float]:
        return timed(forward, forwards)


def timed(forward: Forward, forwards: int) -> list[float]:
    latencies = []
    for _ in range(forwards):
        started = time.perf_counter()
        forward()
        latencies.append(time.perf_counter() - started)
    return latencies


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("png", type=Path, help="the image every forward's input is made of")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torchscript",
                        help="what runs the forwards (default: torchscript)")  # fmt: skip
    return parser


def main(args: argparse.Namespace) -> int:
    png = args.png.read_bytes()
    runner = (TorchScriptForwards if args.runtime == "torchscript" else OnnxRuntimeForwards)(png)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        forward = runner.forward(command["model"], command["threads"])
        latencies = runner.timed(forward, command["forwards"])
        sys.stdout.write(json.dumps({"latencies": latencies}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
