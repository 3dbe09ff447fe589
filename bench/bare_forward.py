"""The bare forward of an artifact's model file, as a new user would time it, driven over stdin.

A separate process from the service and from the load generator, one per runtime
(`--runtime`, default torchscript), one preprocessed input per model, batch 1 unless a command
asks for more (that image repeated):

- torchscript: model.pt as shared.inference.load_module loads it (`torch.jit.load`, `eval()`),
  `torch.inference_mode()`, flush-denormal on, `torch.set_num_threads(threads)`;
- onnxruntime: the session shared.onnx_runtime makes of model.onnx (intra-op threads
  `threads`, one inter-op thread, CPUExecutionProvider, spinning on as onnxruntime's default)
  and `session.run` (a session's thread pool is sized when it is made: one session per thread
  count; torch is not imported).

bench/bench_service.py starts it, then sends one JSON object per line and reads one back:

    {"model": "<path>", "threads": 2, "forwards": 20}  ->  {"latencies": [seconds, ...]}
    {"model": "<path>", "threads": 2, "forwards": 20, "batch": 4}  ->  the same, 4 images a forward
    {"quit": true}

`model` is the model.pt or model.onnx of a verified artifact; its manifest gives the
preprocessing (shared.inference.model_input). Nothing else runs in this process while the
service is being measured: it blocks on stdin.
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
from shared.inference import load_module, model_input  # noqa: E402
from shared.onnx_runtime import OnnxSessions  # noqa: E402
from shared.store import ArtifactInfo, verify_artifact  # noqa: E402

RUNTIMES = ("torchscript", "onnxruntime")
_SETTLE = 3  # untimed forwards after a thread-count switch

Forward = Callable[[], object]


def artifact_of(model_path: Path) -> ArtifactInfo:
    """The verified artifact whose version folder holds `model_path`."""
    version = model_path.parent
    return verify_artifact(version.parent.parent, version.parent.name, version.name)


def preprocessed(info: ArtifactInfo, png: bytes) -> np.ndarray:
    """The batch-1 input its own manifest's preprocessing makes of `png`."""
    x, _ = model_input(info.manifest.preprocessing, decode_image(png).pixels)
    return x[None]


class TorchScriptForwards:
    """One module per file; the thread count is torch's, set per command."""

    def __init__(self, png: bytes) -> None:
        import torch

        torch.set_flush_denormal(True)
        self.torch, self.png = torch, png
        self.loaded: dict[tuple[str, int], Forward] = {}
        self.threads_now = 0

    def forward(self, path: str, threads: int, batch: int = 1) -> Forward:
        torch = self.torch
        if (path, batch) not in self.loaded:
            info = artifact_of(Path(path))
            module = load_module(info)
            x = torch.from_numpy(np.repeat(preprocessed(info, self.png), batch, axis=0))
            self.loaded[path, batch] = lambda: module(x)
            with torch.inference_mode():
                for _ in range(_SETTLE):  # the profiling executor specialises on the second call
                    self.loaded[path, batch]()
        if threads != self.threads_now:
            self.threads_now = threads
            torch.set_num_threads(threads)
            with torch.inference_mode():
                for _ in range(_SETTLE):
                    self.loaded[path, batch]()
        return self.loaded[path, batch]

    def timed(self, forward: Forward, forwards: int) -> list[float]:
        with self.torch.inference_mode():
            return timed(forward, forwards)


class OnnxRuntimeForwards:
    """One session per file and thread count (shared.onnx_runtime), made and settled on first
    use."""

    def __init__(self, png: bytes) -> None:
        self.png = png
        self.models: dict[str, tuple[OnnxSessions, np.ndarray]] = {}
        self.settled: set[tuple[str, int, int]] = set()

    def forward(self, path: str, threads: int, batch: int = 1) -> Forward:
        if path not in self.models:
            info = artifact_of(Path(path))
            self.models[path] = (OnnxSessions.from_file(Path(path)), preprocessed(info, self.png))
        sessions, x = self.models[path]
        session, name = sessions.session(threads)
        feed = {name: np.repeat(x, batch, axis=0)}
        forward: Forward = lambda: session.run(None, feed)  # noqa: E731
        if (path, threads, batch) not in self.settled:
            self.settled.add((path, threads, batch))
            for _ in range(_SETTLE):
                forward()
        return forward

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
        forward = runner.forward(command["model"], command["threads"], command.get("batch", 1))
        latencies = runner.timed(forward, command["forwards"])
        sys.stdout.write(json.dumps({"latencies": latencies}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
