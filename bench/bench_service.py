"""Latency and throughput of the service over HTTP against the bare model forward, in one run.

Starts `python -m service` on a free loopback port over MODEL_DIR (default: the embedded models/),
sends a synthetic 256x256 grayscale PNG to /classify, /segment and /diagnose with 1 and N
concurrent keep-alive clients, then times the bare forward of the very artifacts the service
serves, in this process, with the same thread settings (service.registry.configure_torch), the
same loading and warm-up (service.registry.load_model) and the same preprocessed tensor, at
batch 1. Prints a Markdown table, the two target ratios and the service's resident memory.

    .venv/bin/python bench/bench_service.py                      # embedded models, N=4
    .venv/bin/python bench/bench_service.py --model-dir /models --clients 8 --json out.json

Every request loop is bounded by a request count and a time limit, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.registry import configure_torch, load_model  # noqa: E402
from service.settings import available_cpus, default_torch_threads  # noqa: E402
from shared.artifacts import verify_artifact  # noqa: E402
from shared.decoding import decode_image  # noqa: E402
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASKS  # noqa: E402

ENDPOINTS = ("/classify", "/segment", "/diagnose")
TARGET_P50_RATIO = 1.3  # /classify p50 at 1 client <= 1.3 x bare forward p50
TARGET_THROUGHPUT_RATIO = 0.8  # /classify throughput at N >= 0.8 x bare forward loop


@dataclass
class Result:
    name: str
    clients: int
    requests: int
    p50_ms: float
    p95_ms: float
    throughput_rps: float
    errors: int = 0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=REPO / "models",
        help="registry the service serves (default: the embedded models/)",
    )
    parser.add_argument(
        "--clients", type=int, default=4, help="concurrent clients of the second round (default: 4)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=200,
        help="most requests (or forwards) per measurement (default: 200)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="most seconds per measurement (default: 20)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed requests per endpoint before measuring (default: 10)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=default_torch_threads(),
        help="TORCH_THREADS for the service and the bare forward "
        "(default: the service's default, usable CPUs - 1)",
    )
    parser.add_argument(
        "--image-size", type=int, default=256, help="side of the synthetic PNG (default: 256)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the results as JSON to this file"
    )
    return parser


# --- inputs and machine ---------------------------------------------------------------------


def synthetic_png(size: int) -> bytes:
    """A grayscale scan-like PNG: speckle over a gradient with a dark ellipse (a 'lesion')."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 60 + 120 * (y / size) + rng.normal(0, 20, (size, size))
    inside = ((x - size * 0.55) / (size * 0.18)) ** 2 + ((y - size * 0.45) / (size * 0.12)) ** 2
    image[inside < 1] *= 0.3
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "usable_cpus": str(available_cpus()),
        "loadavg_at_start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def training_running() -> bool:
    """Whether a `python -m training` job shares this machine (its numbers are then not
    representative: training takes the same cores)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-m" in args and b"training" in args:
            return True
    return False


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


# --- the service ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(model_dir: Path, threads: int, log_file) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "TORCH_THREADS": str(threads),
        "RELOAD_INTERVAL_S": "0",  # nothing but the measured work in the process
        "LOG_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log_file, stderr=log_file
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, base_url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with status {process.returncode}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def stop_service(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- measurements ---------------------------------------------------------------------------


def summarise(name: str, clients: int, latencies: list[float], wall: float, errors: int) -> Result:
    ordered = sorted(latencies)
    p95_index = min(len(ordered) - 1, max(0, round(0.95 * len(ordered)) - 1))
    return Result(
        name=name,
        clients=clients,
        requests=len(ordered),
        p50_ms=1000 * statistics.median(ordered),
        p95_ms=1000 * ordered[p95_index],
        throughput_rps=len(ordered) / wall,
        errors=errors,
    )


def measure_http(
    base_url: str, endpoint: str, body: bytes, clients: int, max_requests: int, max_seconds: float
) -> Result:
    """`clients` threads, each with its own keep-alive connection, share a budget of requests."""
    lock = threading.Lock()
    budget = [max_requests]
    latencies: list[float] = []
    errors = [0]
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                started = time.perf_counter()
                response = client.post(endpoint, content=body,
                                       headers={"Content-Type": "image/png"})  # fmt: skip
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status_code == 200:
                        latencies.append(elapsed)
                    else:
                        errors[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if not latencies:
        raise RuntimeError(f"{endpoint}: no request succeeded ({errors[0]} failed)")
    return summarise(endpoint, clients, latencies, wall, errors[0])


def measure_bare_forward(
    model_dir: Path, task: str, version: str, png: bytes, max_forwards: int, max_seconds: float
) -> Result:
    """The served artifact's forward alone at batch 1, in a loop: no HTTP, decode, postprocess."""
    import torch

    model = load_model(verify_artifact(model_dir, task, version))  # verifies, loads, warms up
    batch = torch.from_numpy(model.preprocessing(decode_image(png).pixels)[None])
    if tuple(batch.shape[1:]) != model.input_shape:
        raise RuntimeError(
            f"{task} {version} takes {model.input_shape}, preprocessing gives "
            f"{tuple(batch.shape[1:])}: build the input as service/predictors.py does"
        )
    latencies = []
    deadline = time.monotonic() + max_seconds
    started = time.perf_counter()
    with torch.inference_mode():
        while len(latencies) < max_forwards and time.monotonic() < deadline:
            t0 = time.perf_counter()
            model.module(batch)
            latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    return summarise(f"bare forward ({task})", 1, latencies, wall, 0)


def on_worker_thread(function, *args):
    """function(*args) on a new thread; its result or its exception."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:  # re-raised on the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="bare-forward")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# --- report ---------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def markdown(results: list[Result], facts: dict[str, str], extra: dict[str, object]) -> str:
    lines = [
        f"Machine: {facts['cpu']}, {facts['nproc']} CPUs ({facts['usable_cpus']} usable), "
        f"load average at start {facts['loadavg_at_start']}; Python {facts['python']}, "
        f"torch {facts['torch']}, TORCH_THREADS={extra['threads']}; {facts['date']}.",
        "Models: "
        + ", ".join(f"{task} {version}" for task, version in extra["versions"].items())
        + f" from {extra['model_dir']}; "
        f"input {extra['image_size']}x{extra['image_size']} grayscale PNG "
        f"({extra['png_bytes']} bytes).",
        "",
        "| measurement | clients | requests | p50 ms | p95 ms | throughput /s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.clients} | {r.requests} | {r.p50_ms:.1f} | {r.p95_ms:.1f} "
            f"| {r.throughput_rps:.1f} | {r.errors} |"
        )
    ratios = extra["ratios"]
    lines += [
        "",
        f"- /classify p50 at 1 client / bare forward p50: **{ratios['p50']:.2f}** "
        f"(target <= {TARGET_P50_RATIO}: {verdict(ratios['p50'] <= TARGET_P50_RATIO)})",
        f"- /classify throughput at {extra['clients']} clients / bare forward loop throughput: "
        f"**{ratios['throughput']:.2f}** (target >= {TARGET_THROUGHPUT_RATIO}: "
        f"{verdict(ratios['throughput'] >= TARGET_THROUGHPUT_RATIO)})",
        f"- service resident memory: {extra['rss_after_warmup_mib']:.0f} MiB after warm-up, "
        f"{extra['rss_peak_mib']:.0f} MiB peak (VmRSS / VmHWM of the service process)",
        "- the load generator runs on the same cores as the service; on a machine shared with "
        "other work absolute times drift, so compare the ratios, taken in one run.",
    ]
    busy = float(facts["loadavg_at_start"].split()[0])
    if busy > 0.5 * int(facts["usable_cpus"]):
        lines.append(
            f"- WARNING: the machine was busy at the start (1-minute load {busy:.1f} on "
            f"{facts['usable_cpus']} CPUs); with other work on the cores these numbers are NOT "
            "representative."
        )
    if extra["training_running"]:
        lines.append(
            "- WARNING: a training job (`python -m training`) was running during this benchmark; "
            "these numbers are NOT representative."
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    model_dir = args.model_dir.resolve()
    facts = machine_facts()
    png = synthetic_png(args.image_size)
    trained_during = training_running()
    log_file = tempfile.NamedTemporaryFile("w+", prefix="bench-service-", delete=False)
    process, base_url = start_service(model_dir, args.threads, log_file)
    results: list[Result] = []
    try:
        wait_ready(process, base_url)
        served = httpx.get(f"{base_url}/models", timeout=10).json()
        versions = {
            task: described["version"]
            for task, described in served["models"].items()
            if described is not None and task in TASKS
        }
        for endpoint in ENDPOINTS:
            measure_http(base_url, endpoint, png, 1, args.warmup, args.max_seconds)
        rss_after_warmup = memory_kib(process.pid)["VmRSS"]
        for endpoint in ENDPOINTS:
            for clients in (1, args.clients):
                results.append(measure_http(
                    base_url, endpoint, png, clients, args.requests, args.max_seconds
                ))  # fmt: skip
                print(f"  measured {endpoint} at {clients} client(s)", file=sys.stderr)
        peak = memory_kib(process.pid)["VmHWM"]
    except Exception:
        log_file.flush()
        log_file.seek(0)
        sys.stderr.write(log_file.read()[-4000:])
        raise
    finally:
        stop_service(process)
        log_file.close()
    os.unlink(log_file.name)

    # The service has exited: the bare forwards get the cores to themselves, as it had. As in the
    # service, torch is configured on the main thread and the models load, warm up and run on a
    # worker thread started afterwards (the service's lifespan, then anyio's worker threads).
    configure_torch(args.threads)
    for task in versions:
        results.append(on_worker_thread(
            measure_bare_forward, model_dir, task, versions[task], png, args.requests,
            args.max_seconds,
        ))  # fmt: skip
    trained_during = trained_during or training_running()

    by_key = {(r.name, r.clients): r for r in results}
    # what answers /classify: the joint model when one is served, else the classifier
    classify_task = TASK_DIAGNOSIS if TASK_DIAGNOSIS in versions else TASK_CLASSIFICATION
    bare = by_key[(f"bare forward ({classify_task})", 1)]
    ratios = {
        "p50": by_key[("/classify", 1)].p50_ms / bare.p50_ms,
        "throughput": by_key[("/classify", args.clients)].throughput_rps / bare.throughput_rps,
    }
    extra = {
        "threads": args.threads,
        "clients": args.clients,
        "model_dir": model_dir,
        "versions": versions,
        "image_size": args.image_size,
        "png_bytes": len(png),
        "ratios": ratios,
        "rss_after_warmup_mib": rss_after_warmup / 1024,
        "rss_peak_mib": peak / 1024,
        "training_running": trained_during,
    }
    print(markdown(results, facts, extra))
    if args.json:
        report = {"machine": facts, **extra, "results": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
