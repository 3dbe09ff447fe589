"""The bare forward of TorchScript files, as a new user would time it, driven over stdin.

A separate process from the service and from the load generator: plain `torch.jit.load`,
`eval()`, `torch.inference_mode()`, flush-denormal on, one preprocessed batch-1 input per model.
bench/bench_service.py starts it, then sends one JSON object per line and reads one back:

    {"model": "<path>", "threads": 2, "forwards": 20}  ->  {"latencies": [seconds, ...]}
    {"quit": true}

Nothing else runs in this process while the service is being measured: it blocks on stdin.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.decoding import decode_image  # noqa: E402
from shared.preprocessing import Preprocessing  # noqa: E402

_SETTLE = 3  # untimed forwards after a thread-count switch


def load(model_path: Path, png: bytes) -> tuple[torch.jit.ScriptModule, torch.Tensor]:
    """The module and the batch-1 tensor its own manifest's preprocessing makes of `png`."""
    module = torch.jit.load(str(model_path), map_location="cpu").eval()
    metadata = json.loads((model_path.parent / "metadata.json").read_text())
    preprocessing = Preprocessing.from_metadata(metadata["preprocessing"])
    batch = torch.from_numpy(np.ascontiguousarray(preprocessing(decode_image(png).pixels)[None]))
    with torch.inference_mode():
        for _ in range(_SETTLE):  # the profiling executor specialises on the second call
            module(batch)
    return module, batch


def main() -> int:
    torch.set_flush_denormal(True)
    png = Path(sys.argv[1]).read_bytes()
    loaded: dict[str, tuple[torch.jit.ScriptModule, torch.Tensor]] = {}
    threads_now = 0
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            break
        path = command["model"]
        if path not in loaded:
            loaded[path] = load(Path(path), png)
        module, batch = loaded[path]
        latencies = []
        with torch.inference_mode():
            if command["threads"] != threads_now:
                threads_now = command["threads"]
                torch.set_num_threads(threads_now)
                for _ in range(_SETTLE):
                    module(batch)
            for _ in range(command["forwards"]):
                started = time.perf_counter()
                module(batch)
                latencies.append(time.perf_counter() - started)
        sys.stdout.write(json.dumps({"latencies": latencies}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
