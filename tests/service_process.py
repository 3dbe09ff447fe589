"""`python -m service` as a real subprocess on a free loopback port, for the tests that need one.

A subprocess rather than a thread or a TestClient when what is under test is the process itself:
settings read from the environment once, the models loading in its own lifespan as in production,
signals, the listener, uvicorn's shutdown sequence, an installed copy run away from the source tree.

tests/ is on sys.path (pytest's default "prepend" import mode puts the folder of the rootless
tests/conftest.py there), so any test module can `from service_process import ...`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# One torch thread and no registry polling: nothing but the test's own work in the process, which
# shares the CPU with the test (and, on a busy machine, with everything else).
QUIET_ENV = {"TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "RELOAD_INTERVAL_S": "0"}


def free_port() -> int:
    """A loopback port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """`python -m service` started on a free loopback port, stdout and stderr in `log_path`.

    `env` is laid over this process's environment; HOST and PORT are always set by this class.
    Use it as a context manager (or call stop()) so that the process never outlives the test.
    """

    def __init__(self, env: Mapping[str, str], log_path: Path, *, cwd: Path = REPO_ROOT) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        # Without it torch would start a thread per core in the subprocess as well.
        self.env.setdefault("OMP_NUM_THREADS", "1")
        with log_path.open("wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service"],
                cwd=cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, path: str = "/readyz", timeout_s: float = 90.0) -> None:
        """Return once GET `path` answers 200; fail the test, with the end of the log, if the
        process exits first or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(
                    f"the service exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}{path}", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"{path} did not answer 200 within {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM unless it has exited already, SIGKILL if it is still there after `timeout_s`;
        returns the exit status (-SIGKILL when it had to be killed)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_service(
    env: Mapping[str, str],
    log_path: Path,
    *,
    cwd: Path = REPO_ROOT,
    wait_for: str = "/readyz",
    timeout_s: float = 90.0,
) -> Iterator[ServiceProcess]:
    """Start the service, yield it once `wait_for` answers 200, stop it on the way out."""
    with ServiceProcess(env, log_path, cwd=cwd) as service:
        service.wait_for(wait_for, timeout_s)
        yield service
