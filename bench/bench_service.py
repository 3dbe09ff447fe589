"""The service over HTTP against the bare forward of the very artifact it serves, interleaved.

Starts `python -m service` on a free loopback port over MODEL_DIR (default: the embedded
models/) and, in a separate process (bench/bare_forward.py), the bare forward of each artifact
the service reports in /models: plain torch.jit.load, inference_mode, flush-denormal, batch 1.
Where an artifact carries model.onnx (its manifest's `runtimes`) and onnxruntime is installed,
a second such process times the bare ONNX Runtime forward of that file too. Then, in rounds,
alternates the bare forwards and the service so that drift of a shared machine hits both alike:
each round sends a synthetic 256x256 grayscale PNG to /classify, /segment and /diagnose with 1
and N concurrent keep-alive clients, and times each bare forward at 1 thread and at all usable
CPUs (the better of the two is the yardstick), and once more the fastest runtime's forward for
/classify at the service's batch size (MAX_BATCH_SIZE, at most N) on all CPUs: its images per
second over the batch-1 loop are what batching alone can give the N-client throughput on these
cores (a row without a target). Reports per-round ratios and their median (the
issue's targets against the bare TorchScript fp32 forward; the same ratios against the bare
ONNX Runtime forward as extra rows without a target), p50/p99, throughput, what runtime the
service says it serves, and its resident memory. Then a bounded load test: `--load-clients`
clients for `--load-seconds` against /classify, counting every status (only 200 and 503 are
expected) and the p99 per window.

    .venv/bin/python bench/bench_service.py                      # embedded models, N = 4
    .venv/bin/python bench/bench_service.py --env MAX_BATCH_SIZE=1 --endpoints /classify
    .venv/bin/python bench/bench_service.py --json out.json --markdown out.md

Every request loop is bounded by a request count and a time limit, and talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.settings import available_cpus  # noqa: E402
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION, TASKS  # noqa: E402
from shared.store import MANIFEST_FILE, ArtifactInfo  # noqa: E402
from shared.variants import GRAPH_CLASSIFY, GRAPH_FULL, RUNTIME_ONNX  # noqa: E402

ENDPOINTS = ("/classify", "/segment", "/diagnose")
# The issue's targets, as ratios of the interleaved bench on the shipped models, against the best
# bare runtime of the served artifact in the same round (the faster of TorchScript model.pt and
# ONNX Runtime model.onnx, or classify.onnx for /classify where the artifact carries one).
TARGETS = {
    "classify_p50_1_client": (
        "<=",
        1.2,
        "/classify p50 at 1 client / best bare forward /classify needs, p50",
    ),
    "classify_throughput_n_clients": (
        ">=",
        1.2,
        "/classify throughput at N clients / best bare batch-1 loop of that forward",
    ),
    "diagnose_p50_1_client": ("<=", 1.2, "/diagnose p50 at 1 client / best bare forward p50"),
    "startup_s": ("<=", 10.0, "start-up to /readyz 200, seconds"),
    "rss_after_warmup_mib": ("<=", 600.0, "resident memory after warm-up, MiB"),
}
BEST = "best"  # the yardstick of the targets: per round, the faster bare runtime
# The most batching can give the N-client throughput on these cores, for reading its target: the
# bare forward /classify needs, of as many images as the service groups, in images per second,
# over the best bare batch-1 loop (no target).
CEILING = "classify_bare_batch_ceiling"
DEFAULT_MAX_BATCH = 4  # service.settings MAX_BATCH_SIZE's default
RUNTIME_TORCHSCRIPT = "torchscript"  # the yardstick of the targets: model.pt, fp32
RUNTIME_SETTING = "INFERENCE_RUNTIME"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model-dir", type=Path, default=REPO / "models", help="registry (default: models/)")
    add("--clients", type=int, default=4, help="concurrent clients of the N rows (default: 4)")
    add("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    add("--requests", type=int, default=40, help="requests per client count, endpoint and round "
        "(default: 40; twice that at N clients)")  # fmt: skip
    add("--forwards", type=int, default=20, help="bare forwards per thread count and round "
        "(default: 20)")  # fmt: skip
    add("--max-seconds", type=float, default=20.0, help="most seconds per measurement "
        "(default: 20)")  # fmt: skip
    add("--warmup", type=int, default=10, help="untimed requests per endpoint (default: 10)")
    add("--endpoints", nargs="+", default=list(ENDPOINTS), help="default: all three")
    add("--load-clients", type=int, default=32, help="clients of the load test (default: 32)")
    add("--load-seconds", type=float, default=30.0, help="load test length; 0 skips (default: 30)")
    add("--env", action="append", default=[], metavar="KEY=VALUE",
        help="a setting for the service (repeatable), e.g. MAX_BATCH_SIZE=1")  # fmt: skip
    add("--image-size", type=int, default=256, help="side of the synthetic PNG (default: 256)")
    add("--json", type=Path, default=None, help="also write the results as JSON here")
    add("--markdown", type=Path, default=None, help="also write the Markdown report here")
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
        "onnxruntime": onnxruntime_version() or "not installed",
    }


def onnxruntime_version() -> str | None:
    """The installed onnxruntime's version (the service runs on this interpreter too)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    return importlib.metadata.version("onnxruntime")


def busy_processes(exclude: set[int]) -> list[str]:
    """Other processes using a CPU right now (over ~20 % in a 0.5 s sample): the machine is
    shared and absolute times are not representative."""

    def ticks() -> dict[int, tuple[int, str]]:
        out = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                fields = text[text.rindex(")") + 2 :].split()
                out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12]), name)
            except (OSError, ValueError):
                continue
        return out

    before = ticks()
    time.sleep(0.5)
    after = ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (total, name) in after.items():
        if pid in exclude or pid not in before:
            continue
        share = (total - before[pid][0]) / hz / 0.5
        if share > 0.2:
            busy.append(f"{name} (pid {pid}, {100 * share:.0f}% of a CPU)")
    return busy


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (resident now), VmHWM (peak resident) and VmRSS's parts, RssAnon (the process's own
    memory) and RssFile (pages of mapped files: the libraries), of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0])
    return values


# --- the service ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(
    model_dir: Path, extra_env: dict[str, str], log_file
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(model_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "RELOAD_INTERVAL_S": "0",  # nothing but the measured work in the process
        "LOG_LEVEL": "WARNING",
        **extra_env,
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
        time.sleep(0.05)
    raise RuntimeError(f"the service was not ready within {timeout:.0f} s")


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- measurements ---------------------------------------------------------------------------


@dataclass
class Sample:
    """One measurement of one round."""

    latencies: list[float]
    wall: float
    statuses: Counter = field(default_factory=Counter)

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies)

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def p99_ms(samples: list[Sample]) -> float:
    return round(1000 * percentile([x for s in samples for x in s.latencies], 99), 1)


def run_clients(
    base_url: str, endpoint: str, body: bytes, clients: int, max_requests: int, seconds: float
) -> tuple[Sample, list[tuple[float, float]]]:
    """`clients` threads, each with its own keep-alive connection, share a budget of requests.
    Returns the successful latencies and every status, and (time, latency) of the 200s."""
    lock = threading.Lock()
    budget = [max_requests]
    sample = Sample([], 0.0)
    timeline: list[tuple[float, float]] = []
    deadline = time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                began = time.perf_counter()
                try:
                    response = client.post(
                        endpoint, content=body, headers={"Content-Type": "image/png"}
                    )
                    status: int | str = response.status_code
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                elapsed = time.perf_counter() - began
                with lock:
                    sample.statuses[status] += 1
                    if status == 200:
                        sample.latencies.append(elapsed)
                        timeline.append((began - started, elapsed))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sample.wall = time.perf_counter() - started
    return sample, timeline


class BareForward:
    """A bare-forward process (bench/bare_forward.py) for one runtime."""

    def __init__(self, png_file: Path, runtime: str = RUNTIME_TORCHSCRIPT) -> None:
        script = str(REPO / "bench" / "bare_forward.py")
        self.process = subprocess.Popen(
            [sys.executable, script, str(png_file), "--runtime", runtime],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def time(self, model: Path, threads: int, forwards: int, batch: int = 1) -> Sample:
        """`forwards` timed forwards of `batch` images each (Sample.latencies per forward)."""
        assert self.process.stdin and self.process.stdout
        command = {"model": str(model), "threads": threads, "forwards": forwards, "batch": batch}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bare-forward process exited ({self.process.wait()})")
        latencies = json.loads(line)["latencies"]
        return Sample(latencies, sum(latencies))

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.process)


def forwards_needed(versions: dict[str, str], endpoint: str) -> list[str]:
    """The tasks whose forwards an endpoint runs: one joint forward, else the separate models
    (/diagnose on a pair: the classifier, and the segmenter for a lesion, which the synthetic
    scan is taken to be, the worse case)."""
    if TASK_DIAGNOSIS in versions:
        return [TASK_DIAGNOSIS]
    return {
        "/classify": [TASK_CLASSIFICATION],
        "/segment": [TASK_SEGMENTATION],
        "/diagnose": [TASK_CLASSIFICATION, TASK_SEGMENTATION],
    }[endpoint]


def classify_forward(task: str) -> str:
    """The name of a task's classify-only forward (its artifact's classify.onnx)."""
    return f"{task}/classify"


def bare_forwards(versions: dict[str, str], endpoint: str, timed: set[str] | dict) -> list[str]:
    """The bare forwards an endpoint's answer needs in one runtime: forwards_needed, with a
    joint model's classify-only graph for /classify where that runtime times one."""
    tasks = forwards_needed(versions, endpoint)
    if endpoint == "/classify":
        return [classify_forward(t) if classify_forward(t) in timed else t for t in tasks]
    return tasks


def load_test(base_url: str, body: bytes, clients: int, seconds: float) -> dict[str, object]:
    sample, timeline = run_clients(base_url, "/classify", body, clients, 10**9, seconds)
    window = 5.0
    windows: dict[int, list[float]] = {}
    for began, latency in timeline:
        windows.setdefault(int(began // window), []).append(latency)
    return {
        "clients": clients,
        "seconds": round(sample.wall, 1),
        "statuses": {str(k): v for k, v in sorted(sample.statuses.items(), key=str)},
        "ok_per_s": round(sample.throughput, 1),
        "p50_ms": round(1000 * percentile(sample.latencies, 50), 1),
        "p99_ms": round(1000 * percentile(sample.latencies, 99), 1),
        "p99_ms_per_window": [round(1000 * percentile(windows[k], 99), 1) for k in sorted(windows)],
        "window_s": window,
        "only_200_and_503": set(sample.statuses) <= {200, 503},
    }


# --- the runtimes ---------------------------------------------------------------------------


def onnx_variants(model_dir: Path, versions: dict[str, str], tasks: set[str]) -> dict[str, dict]:
    """The model.onnx of each of `tasks` whose served artifact's manifest carries one, and
    whether its validation against TorchScript fp32 holds (what INFERENCE_RUNTIME=auto needs to
    serve it). The service has verified the files' checksums before serving them."""
    variants = {}
    for task in sorted(tasks):
        folder = model_dir / task / versions[task]
        metadata = json.loads((folder / MANIFEST_FILE).read_text())
        info = ArtifactInfo(task=task, version=versions[task], path=folder, metadata=metadata)
        for key, graph in ((task, GRAPH_FULL), (classify_forward(task), GRAPH_CLASSIFY)):
            variant = info.manifest.runtime(RUNTIME_ONNX, graph)
            if variant is not None:
                variants[key] = {
                    "path": str(info.runtime_path(variant)),
                    "holds": variant.holds,
                    "deltas": {k: round(v, 4) for k, v in variant.deltas.items()},
                }
    return variants


def requested_runtime(extra_env: dict[str, str]) -> dict[str, str]:
    """INFERENCE_RUNTIME as the service gets it: `--env`, else this process's environment (the
    service inherits it), else the service's default."""
    for source, env in (("--env", extra_env), ("environment", os.environ)):
        if RUNTIME_SETTING in env:
            return {"value": env[RUNTIME_SETTING], "from": source}
    return {"value": "auto", "from": "default"}


def served_runtimes(models: dict[str, dict | None], metrics_text: str) -> dict[str, str]:
    """What runs each served task's forwards, as the service says: GET /models' `runtime`, else
    /metrics' busi_model_runtime; "not reported" by a service that says neither."""
    from_metrics = {}
    for line in metrics_text.splitlines():
        if line.startswith("busi_model_runtime{") and float(line.rsplit(" ", 1)[1]) > 0:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            from_metrics[labels.get("task")] = labels.get("runtime")
    return {
        task: described.get("runtime") or from_metrics.get(task) or "not reported"
        for task, described in models.items()
        if described is not None and task in TASKS
    }


# --- the run --------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    model_dir = args.model_dir.resolve()
    extra_env = dict(item.split("=", 1) for item in args.env)
    facts = machine_facts()
    png = synthetic_png(args.image_size)
    png_file = Path(tempfile.mkstemp(prefix="bench-", suffix=".png")[1])
    png_file.write_bytes(png)
    log_file = tempfile.NamedTemporaryFile("w+", prefix="bench-service-", delete=False)
    started = time.perf_counter()
    process, base_url = start_service(model_dir, extra_env, log_file)
    bare: dict[str, BareForward] = {}  # per runtime
    thread_options = sorted({1, available_cpus()})
    batch_max = min(args.clients, int(extra_env.get("MAX_BATCH_SIZE", DEFAULT_MAX_BATCH)))
    http: dict[tuple[str, int], list[Sample]] = {}
    # per runtime and task: the better thread count of each round, and each thread count's p50s
    forward: dict[str, dict[str, list[Sample]]] = {}
    forward_by_threads: dict[str, dict[str, dict[int, list[float]]]] = {}
    ratios: dict[str, list[float]] = {}
    try:
        wait_ready(process, base_url)
        startup_s = time.perf_counter() - started
        busy = busy_processes({os.getpid(), process.pid})
        served = httpx.get(f"{base_url}/models", timeout=10).json()["models"]
        versions = {t: d["version"] for t, d in served.items() if d is not None and t in TASKS}
        runtimes = {
            "INFERENCE_RUNTIME": requested_runtime(extra_env),
            "served": served_runtimes(served, httpx.get(f"{base_url}/metrics", timeout=10).text),
        }
        needed = {t for e in args.endpoints for t in forwards_needed(versions, e)}
        model_files = {
            RUNTIME_TORCHSCRIPT: {
                t: model_dir / t / versions[t] / "model.pt" for t in sorted(needed)
            }
        }
        variants = onnx_variants(model_dir, versions, needed)
        runtimes["model_onnx"] = {
            t: {k: v[k] for k in ("holds", "deltas")} for t, v in variants.items()
        }
        if variants and onnxruntime_version():
            model_files[RUNTIME_ONNX] = {t: Path(v["path"]) for t, v in variants.items()}
        # after start-up, which their imports would otherwise slow down
        for runtime in model_files:
            bare[runtime] = BareForward(png_file, runtime)
        for endpoint in args.endpoints:
            run_clients(base_url, endpoint, png, 1, args.warmup, args.max_seconds)
            run_clients(base_url, endpoint, png, args.clients, args.warmup, args.max_seconds)
        memory_after_warmup = memory_kib(process.pid)
        rss_after_warmup = memory_after_warmup["VmRSS"]
        for round_ in range(args.rounds):
            # the bare forwards of this round: each thread count, the better one counts
            best_of_round: dict[str, dict[str, Sample]] = {}
            for runtime, files in model_files.items():
                best = best_of_round.setdefault(runtime, {})
                for task, path in files.items():
                    for threads in thread_options:
                        sample = bare[runtime].time(path, threads, args.forwards)
                        by_threads = forward_by_threads.setdefault(runtime, {}).setdefault(task, {})
                        by_threads.setdefault(threads, []).append(sample.p50)
                        if task not in best or sample.p50 < best[task].p50:
                            best[task] = sample
                    forward.setdefault(runtime, {}).setdefault(task, []).append(best[task])
            if "/classify" in args.endpoints and batch_max > 1:
                ceiling = batching_ceiling(
                    bare, model_files, best_of_round, versions, batch_max, max(thread_options),
                    args.forwards,
                )  # fmt: skip
                if ceiling is not None:
                    ratios.setdefault(CEILING, []).append(ceiling)
            for endpoint in args.endpoints:
                # the yardstick of each runtime that has every forward the endpoint needs
                bare_p50 = {}
                for runtime, best in best_of_round.items():
                    needed = bare_forwards(versions, endpoint, best)
                    if all(t in best for t in needed):
                        bare_p50[runtime] = sum(best[t].p50 for t in needed)
                bare_p50[BEST] = min(bare_p50.values())
                for clients in (1, args.clients):
                    requests = args.requests * (1 if clients == 1 else 2)
                    sample, _ = run_clients(
                        base_url, endpoint, png, clients, requests, args.max_seconds
                    )
                    if not sample.latencies:
                        raise RuntimeError(f"{endpoint}: no request succeeded {sample.statuses}")
                    http.setdefault((endpoint, clients), []).append(sample)
                    for runtime, p50 in bare_p50.items():
                        key = ratio_key(endpoint, clients == 1, runtime)
                        value = sample.p50 / p50 if clients == 1 else sample.throughput * p50
                        ratios.setdefault(key, []).append(value)
            for task, sample in best_of_round.get(RUNTIME_ONNX, {}).items():
                if task not in best_of_round[RUNTIME_TORCHSCRIPT]:
                    continue  # a classify-only graph has no TorchScript counterpart
                reference = best_of_round[RUNTIME_TORCHSCRIPT][task].p50
                ratios.setdefault(f"bare_{task}_torchscript_over_onnxruntime", []).append(
                    reference / sample.p50
                )
            print(f"  round {round_ + 1}/{args.rounds} done", file=sys.stderr)
        load = (
            load_test(base_url, png, args.load_clients, args.load_seconds)
            if args.load_seconds > 0
            else None
        )
        metrics_text = httpx.get(f"{base_url}/metrics", timeout=10).text
        peak = memory_kib(process.pid)["VmHWM"]
        facts["loadavg_at_end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    except Exception:
        log_file.flush()
        log_file.seek(0)
        sys.stderr.write(log_file.read()[-4000:])
        raise
    finally:
        for process_ in bare.values():
            process_.close()
        stop_process(process)
        log_file.close()
        png_file.unlink()
    os.unlink(log_file.name)

    runtimes["bare_runtimes"] = list(model_files)
    report = {
        "machine": facts,
        "busy_processes_at_start": busy,
        "settings": extra_env,
        "runtime": runtimes,
        "model_dir": str(model_dir),
        "versions": versions,
        "clients": args.clients,
        "rounds": args.rounds,
        "image": f"{args.image_size}x{args.image_size} grayscale PNG, {len(png)} bytes",
        "startup_s": round(startup_s, 2),
        "http": [
            {
                "endpoint": endpoint,
                "clients": clients,
                "requests": sum(len(s.latencies) for s in samples),
                "p50_ms": round(1000 * statistics.median(s.p50 for s in samples), 1),
                "p99_ms": p99_ms(samples),
                "throughput_rps": round(statistics.median(s.throughput for s in samples), 1),
                "errors": sum(n for s in samples for k, n in s.statuses.items() if k != 200),
            }
            for (endpoint, clients), samples in http.items()
        ],
        # the yardstick of the targets (TorchScript fp32), then ONNX Runtime's where timed
        "bare_forward": bare_summary(forward, forward_by_threads, RUNTIME_TORCHSCRIPT),
        "bare_forward_onnxruntime": bare_summary(forward, forward_by_threads, RUNTIME_ONNX),
        "ratios_per_round": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "ratios": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "rss_after_warmup_mib": round(rss_after_warmup / 1024, 1),
        "rss_after_warmup_parts_mib": {
            key: round(memory_after_warmup.get(key, 0) / 1024, 1) for key in ("RssAnon", "RssFile")
        },
        "rss_peak_mib": round(peak / 1024, 1),
        "batch_sizes": batch_size_summary(metrics_text),
        "load_test": load,
    }
    report["ratios"]["startup_s"] = report["startup_s"]
    report["ratios"]["rss_after_warmup_mib"] = report["rss_after_warmup_mib"]
    text = markdown(report)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def batching_ceiling(
    bare: dict[str, BareForward],
    model_files: dict[str, dict[str, Path]],
    best_of_round: dict[str, dict[str, Sample]],
    versions: dict[str, str],
    batch: int,
    threads: int,
    forwards: int,
) -> float | None:
    """Images per second of the bare `batch`-image forward /classify needs, in the runtime whose
    batch-1 forward was fastest this round, at `threads` threads, times that batch-1 p50; None
    when /classify needs more than one forward (a pair of models)."""
    fastest = None
    for runtime, files in model_files.items():
        needed = bare_forwards(versions, "/classify", best_of_round[runtime])
        if len(needed) != 1 or needed[0] not in files:
            return None
        p50 = best_of_round[runtime][needed[0]].p50
        if fastest is None or p50 < fastest[0]:
            fastest = (p50, runtime, files[needed[0]])
    if fastest is None:
        return None
    p50, runtime, path = fastest
    sample = bare[runtime].time(path, threads, forwards, batch)
    return batch / sample.p50 * p50


def ratio_key(endpoint: str, one_client: bool, runtime: str) -> str:
    """`classify_p50_1_client`, `classify_throughput_n_clients`, ...: against the best bare
    runtime (the targets); against one runtime's bare forward, suffixed `_vs_<runtime>`."""
    key = f"{endpoint.strip('/')}_{'p50_1_client' if one_client else 'throughput_n_clients'}"
    return key if runtime == BEST else f"{key}_vs_{runtime}"


def ratio_label(key: str) -> str:
    """The row's text: the issue's wording for a target, the same wording for the other
    endpoints and for the ratios against another runtime's bare forward."""
    if key in TARGETS:
        return TARGETS[key][2]
    base, _, runtime = key.partition("_vs_")
    bare = "best bare" if not runtime else f"bare {runtime}"
    endpoint, _, measure = base.partition("_")
    if measure == "p50_1_client":
        if endpoint == "diagnose":
            return f"/diagnose p50 at 1 client / sum of its {bare} forwards"
        return f"/{endpoint} p50 at 1 client / {bare} forward p50"
    if measure == "throughput_n_clients":
        return f"/{endpoint} throughput at N clients / {bare} batch-1 loop"
    if key == CEILING:
        return (
            "bare batched forward /classify needs (as many images as the service groups), images "
            "per second / best bare batch-1 loop: what batching alone can give"
        )
    if base.startswith("bare_") and base.endswith("_torchscript_over_onnxruntime"):
        task = base.removeprefix("bare_").removesuffix("_torchscript_over_onnxruntime")
        return f"bare torchscript forward p50 / bare onnxruntime forward p50, {task}"
    return key.replace("_", " ")


def bare_summary(
    forward: dict[str, dict[str, list[Sample]]],
    forward_by_threads: dict[str, dict[str, dict[int, list[float]]]],
    runtime: str,
) -> dict[str, dict]:
    """Per task, the medians over rounds of one runtime's bare forward ({} when not timed)."""
    return {
        task: {
            "p50_ms_by_threads": {
                str(t): round(1000 * statistics.median(v), 1) for t, v in by_threads.items()
            },
            "p50_ms": round(1000 * statistics.median(s.p50 for s in forward[runtime][task]), 1),
            "p99_ms": round(
                1000 * percentile([x for s in forward[runtime][task] for x in s.latencies], 99), 1
            ),
            "loop_rps": round(statistics.median(1 / s.p50 for s in forward[runtime][task]), 1),
        }
        for task, by_threads in forward_by_threads.get(runtime, {}).items()
    }


def batch_size_summary(metrics_text: str) -> dict[str, float]:
    """Forwards and images per task from busi_batch_size, over the whole run."""
    summary: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for suffix in ("_count", "_sum"):
            prefix = f"busi_batch_size{suffix}{{"
            if line.startswith(prefix):
                task = line.split('task="', 1)[1].split('"', 1)[0]
                key = "forwards" if suffix == "_count" else "images"
                summary[f"{task}_{key}"] = float(line.rsplit(" ", 1)[1])
    return summary


def runtime_line(runtime: dict) -> str:
    """What the service was asked to run the forwards with, what it says it ran them with, and
    which artifacts carry model.onnx."""
    requested = runtime["INFERENCE_RUNTIME"]
    source = {"default": "the default", "--env": "--env", "environment": "from the environment"}
    served = ", ".join(f"{t} {r}" for t, r in runtime["served"].items()) or "nothing"
    carried = (
        ", ".join(
            f"{t} (validation {'holds' if v['holds'] else 'does NOT hold'})"
            for t, v in runtime["model_onnx"].items()
        )
        or "none of the timed artifacts"
    )
    timed = " and ".join(runtime["bare_runtimes"])
    return (
        f"Runtime: INFERENCE_RUNTIME={requested['value']} ({source[requested['from']]}); the "
        f"service says it serves {served}; model.onnx carried by {carried}; bare forwards timed: "
        f"{timed}."
    )


def verdict(key: str, value: float) -> str:
    if key not in TARGETS:
        return "no target" if "onnxruntime" in key or key == CEILING else ""
    op, target, _ = TARGETS[key]
    met = value <= target if op == "<=" else value >= target
    return f"{op} {target:g}: {'met' if met else 'NOT met'}"


def markdown(report: dict) -> str:
    facts = report["machine"]
    lines = [
        f"Machine: {facts['cpu']}, {facts['nproc']} CPUs ({facts['usable_cpus']} usable), load "
        f"average at start {facts['loadavg_at_start']}; Python {facts['python']}, torch "
        f"{facts['torch']}, onnxruntime {facts.get('onnxruntime', 'unknown')}; {facts['date']}.",
        "Models: "
        + ", ".join(f"{t} {v}" for t, v in report["versions"].items())
        + f"; input {report['image']}; settings: "
        + (", ".join(f"{k}={v}" for k, v in report["settings"].items()) or "the defaults")
        + f"; {report['rounds']} alternating rounds.",
        runtime_line(report["runtime"]),
        "",
        "| measurement | clients | p50 ms | p99 ms | throughput /s | errors |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["http"]:
        lines.append(
            f"| `{row['endpoint']}` | {row['clients']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['throughput_rps']:.1f} | {row['errors']} |"
        )
    bare_rows = {
        "bare torchscript forward": report["bare_forward"],
        "bare onnxruntime forward": report.get("bare_forward_onnxruntime", {}),
    }
    for what, figures in bare_rows.items():
        for task, fig in figures.items():
            by_threads = ", ".join(f"{t} thr {v:.1f}" for t, v in fig["p50_ms_by_threads"].items())
            lines.append(
                f"| {what}, {task} (best of {by_threads}) | 1 | {fig['p50_ms']:.1f} "
                f"| {fig['p99_ms']:.1f} | {fig['loop_rps']:.1f} | 0 |"
            )
    lines += ["", "| ratio (median over rounds) | value | per round | target |",
              "|---|---:|---|---|"]  # fmt: skip
    for key, value in report["ratios"].items():
        label = ratio_label(key)
        per_round = ", ".join(f"{x:.2f}" for x in report["ratios_per_round"].get(key, []))
        lines.append(f"| {label} | **{value:.2f}** | {per_round} | {verdict(key, value)} |")
    lines += [
        "",
        f"- service resident memory: {report['rss_after_warmup_mib']:.0f} MiB after warm-up "
        f"(anonymous {report['rss_after_warmup_parts_mib']['RssAnon']:.0f} MiB, mapped files "
        f"{report['rss_after_warmup_parts_mib']['RssFile']:.0f} MiB), "
        f"{report['rss_peak_mib']:.0f} MiB peak (VmRSS / VmHWM)",
        "- batching over the run: "
        + (", ".join(f"{k} {v:.0f}" for k, v in report["batch_sizes"].items()) or "no batches"),
        "- throughput ratios are requests per second times the bare forward's p50 of the same "
        "round (the bare batch-1 loop's rate); the load generator runs on the same cores.",
    ]
    if report.get("bare_forward_onnxruntime"):
        lines.append(
            "- the targets are against the best bare runtime of each round (the faster of the "
            "bare torchscript model.pt and the bare onnxruntime model.onnx, classify.onnx for "
            "/classify where the artifact carries one); the `_vs_` rows give the ratios against "
            "each runtime, and the bare torchscript / onnxruntime rows the gain from the runtime."
        )
    load = report["load_test"]
    if load:
        lines.append(
            f"- load test, {load['clients']} clients for {load['seconds']} s on /classify: "
            f"statuses {load['statuses']}, {load['ok_per_s']} answered/s, p50 {load['p50_ms']} ms, "
            f"p99 {load['p99_ms']} ms, p99 per {load['window_s']:g} s window "
            f"{load['p99_ms_per_window']}; only 200 and 503: {load['only_200_and_503']}"
        )
    lines.append(
        f"- load average (1, 5, 15 min) at the start {facts['loadavg_at_start']}, at the end "
        f"{facts.get('loadavg_at_end', 'not read')}"
    )
    if report["busy_processes_at_start"]:
        lines.append(
            "- the machine was shared: busy at the start were "
            + "; ".join(report["busy_processes_at_start"])
            + ". Absolute times drift; the ratios, interleaved in rounds, less so."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
