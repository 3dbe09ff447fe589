"""Where a request's time goes inside the service: CPU time per request, by thread and by stage,
against the bare forward of the same runtime session. Robust to a busy machine: it counts CPU
time (each thread's own clock), not wall time, so other processes on the cores change little.

The service runs in this process as `python -m service` runs it (uvicorn with the service's
protocol, the app from `create_app`, settings from the environment and `--env`), on a thread of
its own; one client (http.client, keep-alive, in a child process) posts the same synthetic PNG
as bench/bench_service.py to each endpoint, one request at a time. For each endpoint:

- per request: the wall time (p50), the CPU time of the service's process, and of each group of
  threads, with how often each blocked (a wake-up to resume it): the event loop (uvicorn,
  middleware, routing, dependencies, the response), the worker threads (decode, preprocess,
  postprocess, quality, encoding), the batcher's forward thread and the runtime's own threads
  (ONNX Runtime's intra-op pool);
- per stage, CPU on the thread that ran it (time.thread_time): the predictor's stages, the
  forward as the batcher calls it (its whole process CPU: the pool threads work for it), the
  audit/drift recorder, the response encoding;
- the bare forward: the same loaded session (or module) called directly on the same input,
  in a loop: its process CPU and wall per call. The service's CPU less this is what the
  service adds.

With `--cprofile` each of the service's Python threads is profiled on its own CPU clock
(cProfile, which slows what it profiles: read its ranking, not its times) and the top functions
are printed per thread group.

    PYTHONPATH=. python bench/profile_request.py --requests 200
    PYTHONPATH=. python bench/profile_request.py --endpoints /classify --cprofile
    PYTHONPATH=. python bench/profile_request.py --env TORCH_THREADS=1 --env LOG_LEVEL=INFO
"""

from __future__ import annotations

import argparse
import cProfile
import http.client
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ENDPOINTS = ("/classify", "/segment", "/diagnose")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models",
                        help="MODEL_DIR (default: the repository's models/)")  # fmt: skip
    parser.add_argument("--endpoints", nargs="+", default=list(ENDPOINTS),
                        help="endpoints to profile (default: all three)")  # fmt: skip
    parser.add_argument("--requests", type=int, default=100,
                        help="timed requests per endpoint (default 100)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed requests per endpoint first (default 10)")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="a service setting (repeatable); default: LOG_LEVEL=WARNING, "
                        "RELOAD_INTERVAL_S=0 as bench_service.py runs it")  # fmt: skip
    parser.add_argument("--image-size", type=int, default=256,
                        help="side of the synthetic PNG (default 256)")  # fmt: skip
    parser.add_argument("--cprofile", action="store_true",
                        help="also profile the service's Python threads (slows them)")  # fmt: skip
    parser.add_argument("--top", type=int, default=25,
                        help="functions listed with --cprofile (default 25)")  # fmt: skip
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"),
                        help="order of the --cprofile listing (default tottime)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser


# --- CPU clocks ------------------------------------------------------------------------------


def thread_group(name: str) -> str:
    if name.startswith("AnyIO worker"):
        return "workers"
    if name == "forward":
        return "forward thread"
    if name == "service":
        return "event loop"
    return "other python"


def python_thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each live Python thread, summed by group."""
    groups: dict[str, float] = defaultdict(float)
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            groups[thread_group(thread.name)] += time.clock_gettime(clock)
        except (OSError, ProcessLookupError):
            continue
    return dict(groups)


def voluntary_switches() -> dict[str, int]:
    """Voluntary context switches so far (a thread that blocked: each costs a wake-up to
    resume it) of each thread of the process, summed by group; "native" for threads Python
    does not know."""
    names = {t.native_id: thread_group(t.name) for t in threading.enumerate()}
    groups: dict[str, int] = defaultdict(int)
    for task in Path("/proc/self/task").iterdir():
        try:
            status = (task / "status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                groups[names.get(int(task.name), "native")] += int(line.split()[1])
    return dict(groups)


class StageClock:
    """CPU seconds and calls per stage, from wrappers around the service's functions."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def wrap(self, owner: Any, name: str, stage: str, clock: Callable[[], float]) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return original(*args, **kwargs)
            finally:
                spent = clock() - started
                with self._lock:
                    self.seconds[stage] += spent
                    self.calls[stage] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def instrument(clock: StageClock) -> None:
    """Wrap the stages of a request (each wrapper: two clock reads, a few microseconds)."""
    from service import audit, predictors, presentation
    from shared import onnx_runtime

    thread = time.thread_time
    process = time.process_time  # the forward: ONNX Runtime's pool threads work for it
    clock.wrap(predictors.Predictor, "open", "decode: sniff, checks, header", thread)
    clock.wrap(predictors.Predictor, "_decode_frame", "decode: pixels", thread)
    clock.wrap(predictors.Predictor, "input_batch", "preprocess", thread)
    clock.wrap(predictors.Predictor, "_forward", "forward, as the predictor waits for it", thread)
    clock.wrap(predictors.Predictor, "_classification", "postprocess: classification", thread)
    clock.wrap(predictors.Predictor, "_segmentation", "postprocess: segmentation", thread)
    clock.wrap(predictors.Predictor, "_facts", "quality check", thread)
    clock.wrap(onnx_runtime.OnnxSessions, "run", "forward: ONNX Runtime run (process CPU)", process)
    clock.wrap(audit.RecordingPredictor, "_input_entry", "audit: input entry", thread)
    clock.wrap(audit.RecordingPredictor, "_observe", "drift/audit: result", thread)
    clock.wrap(presentation, "_encode", "response encoding", thread)
    from service.batching import Batcher

    clock.wrap(Batcher, "run_module", "forward: TorchScript (process CPU)", process)


# --- the service in this process --------------------------------------------------------------


class InProcessService:
    """`python -m service` on a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, env: dict[str, str]) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        os.environ.update({"HOST": "127.0.0.1", "PORT": str(self.port), **env})
        from service.__main__ import uvicorn_config
        from service.app import create_app
        from service.logs import configure_logging
        from service.settings import get_settings

        get_settings.cache_clear()
        settings = get_settings()
        configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
        self.app = create_app(settings)
        import uvicorn

        self.server = uvicorn.Server(uvicorn_config(self.app, settings))
        self.thread = threading.Thread(target=self.server.run, name="service", daemon=True)

    def start(self, timeout: float = 300.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = self.get("/readyz")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become ready")

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


# --- measuring -------------------------------------------------------------------------------


# The client: a child process, so that its CPU and its hold on the GIL stay out of the service's.
_CLIENT = """
import http.client, json, sys, time
port, endpoint, png, warmup, n = sys.argv[1:6]
warmup, n = int(warmup), int(n)
body = open(png, "rb").read()
connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=60)
def post():
    started = time.perf_counter()
    connection.request("POST", endpoint, body=body, headers={"Content-Type": "image/png"})
    response = connection.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{endpoint} answered {response.status}")
    return time.perf_counter() - started
for _ in range(warmup):
    post()
print("ready", flush=True)
sys.stdin.readline()
print(json.dumps([post() for _ in range(n)]), flush=True)
"""


@contextmanager
def cpu_window() -> Iterator[dict[str, float]]:
    """Per-group CPU seconds spent inside the block; "native" is the process's CPU on threads
    Python does not know (ONNX Runtime's pool, torch's OpenMP threads)."""
    out: dict[str, float] = {}
    before, process_before = python_thread_cpu(), time.process_time()
    yield out
    after, process_after = python_thread_cpu(), time.process_time()
    for group in set(before) | set(after):
        out[group] = after.get(group, 0.0) - before.get(group, 0.0)
    out["native"] = (process_after - process_before) - sum(out.values())


@contextmanager
def switches_window() -> Iterator[dict[str, int]]:
    """Per-group voluntary context switches inside the block."""
    out: dict[str, int] = {}
    before = voluntary_switches()
    yield out
    after = voluntary_switches()
    for group in set(before) | set(after):
        out[group] = after.get(group, 0) - before.get(group, 0)


def profile_endpoint(
    service: InProcessService, endpoint: str, png: Path, args: argparse.Namespace,
    clock: StageClock,
) -> dict[str, Any]:  # fmt: skip
    argv = [sys.executable, "-c", _CLIENT, str(service.port), endpoint, str(png),
            str(args.warmup), str(args.requests)]  # fmt: skip
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    if client.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the client failed on {endpoint}")
    clock.reset()
    with switches_window() as switches, cpu_window() as cpu:
        client.stdin.write("go\n")
        client.stdin.flush()
        latencies = json.loads(client.stdout.readline())
    client.wait()
    n = args.requests
    return {
        "wall_p50_ms": 1000 * statistics.median(latencies),
        "service_cpu_ms": 1000 * sum(cpu.values()) / n,
        "threads_cpu_ms": {k: 1000 * v / n for k, v in sorted(cpu.items())},
        "threads_sleeps": {k: v / n for k, v in sorted(switches.items())},
        "stages_cpu_ms": {k: 1000 * v / n for k, v in clock.seconds.items()},
        "stage_calls": {k: c / n for k, c in clock.calls.items()},
    }


def bare_forward(service: InProcessService, endpoint: str, body: bytes, n: int) -> dict[str, Any]:
    """The forward(s) the endpoint runs, called directly on the loaded session(s)."""
    from service.registry import GRAPH_CLASSIFY, GRAPH_FULL
    from shared.decoding import decode_image

    runtime = service.app.state.runtime
    registry, batcher = runtime.registry, runtime.batcher
    joint = registry.joint()
    if joint is not None:
        graph = GRAPH_CLASSIFY if endpoint == "/classify" and joint.classify_onnx else GRAPH_FULL
        calls = [(joint, graph)]
    else:
        tasks = {"/classify": ["classification"], "/segment": ["segmentation"],
                 "/diagnose": ["classification", "segmentation"]}[endpoint]  # fmt: skip
        calls = [(registry.get(task), GRAPH_FULL) for task in tasks]
    threads = batcher.config.threads_alone
    spinning = batcher.config.spin_us > 0  # as a lone request's forward runs
    result: dict[str, Any] = {"cpu_ms": 0.0, "wall_p50_ms": 0.0}
    for model, graph in calls:
        x, _ = runtime.predictor.input_batch(model, decode_image(body))
        for _ in range(3):
            batcher.run(model, x, graph, threads, spinning)
        walls = []
        started = time.process_time()
        for _ in range(n):
            began = time.perf_counter()
            batcher.run(model, x, graph, threads, spinning)
            walls.append(time.perf_counter() - began)
        result["cpu_ms"] += 1000 * (time.process_time() - started) / n
        result["wall_p50_ms"] += 1000 * statistics.median(walls)
    result["runtime"] = sorted({m.runtime for m, _ in calls})
    result["threads"] = threads
    return result


def print_profiles(profiles: dict[str, list[cProfile.Profile]], top: int, sort: str) -> None:
    for group, found in sorted(profiles.items()):
        found = [p for p in found if p.getstats()]
        if not found:
            continue
        print(f"\n### cProfile: {group} ({len(found)} thread(s)), by {sort}\n")
        out = io.StringIO()
        stats = pstats.Stats(*found, stream=out)
        stats.strip_dirs().sort_stats(sort).print_stats(top)
        print(out.getvalue())


def main(args: argparse.Namespace) -> int:
    from bench_service import synthetic_png

    env = {"MODEL_DIR": str(args.model_dir), "RELOAD_INTERVAL_S": "0", "LOG_LEVEL": "WARNING"}
    env.update(dict(item.split("=", 1) for item in args.env))
    clock = StageClock()
    instrument(clock)
    profiles: dict[str, list[cProfile.Profile]] = defaultdict(list)
    if args.cprofile:
        lock = threading.Lock()

        def start_profile(frame: Any, event: str, arg: Any) -> None:
            sys.setprofile(None)
            profile = cProfile.Profile(time.thread_time)  # CPU, not waits
            with lock:
                profiles[thread_group(threading.current_thread().name)].append(profile)
            profile.enable()

        threading.setprofile(start_profile)  # each thread started from now on
    service = InProcessService(env)
    service.start()
    body = synthetic_png(args.image_size)
    png = Path(tempfile.mkstemp(prefix="profile-", suffix=".png")[1])
    png.write_bytes(body)
    report: dict[str, Any] = {"env": env, "endpoints": {}}
    try:
        for endpoint in args.endpoints:
            for found in profiles.values():
                for profile in found:
                    profile.clear()
            figures = profile_endpoint(service, endpoint, png, args, clock)
            if args.cprofile:
                print(f"\n## {endpoint}")
                print_profiles(profiles, args.top, args.sort)
            figures["bare_forward"] = bare_forward(service, endpoint, body, args.requests // 2)
            report["endpoints"][endpoint] = figures
    finally:
        threading.setprofile(None)
        service.stop()
        png.unlink()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict[str, Any]) -> None:
    print("\nsettings:", " ".join(f"{k}={v}" for k, v in report["env"].items()))
    for endpoint, figures in report["endpoints"].items():
        bare = figures["bare_forward"]
        added = figures["service_cpu_ms"] - bare["cpu_ms"]
        print(f"\n## {endpoint}: per request, ms")
        print(f"  wall p50 {figures['wall_p50_ms']:.2f} (bare forward {bare['wall_p50_ms']:.2f}, "
              f"{bare['threads']} threads, {'/'.join(bare['runtime'])})")  # fmt: skip
        print(f"  service CPU {figures['service_cpu_ms']:.2f} = bare forward CPU "
              f"{bare['cpu_ms']:.2f} + {added:.2f} added by the service")  # fmt: skip
        print("  CPU by thread group (and voluntary context switches, each a wake-up):")
        sleeps = figures["threads_sleeps"]
        for group, ms in figures["threads_cpu_ms"].items():
            print(f"    {group:<16} {ms:8.3f}  ({sleeps.get(group, 0):.1f})")
        print("  CPU by stage (calls per request):")
        for stage, ms in sorted(figures["stages_cpu_ms"].items(), key=lambda kv: -kv[1]):
            calls = figures["stage_calls"][stage]
            print(f"    {stage:<44} {ms:8.3f}  ({calls:g})")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
