"""The images install the project with `pip install .[extra]` (not editable) and run it away from
the source tree. These tests do the same without Docker: build the wheel the images would build,
check it holds every data file the packages read, and serve from an installed copy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "shared", "training")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    source = tmp_path_factory.mktemp("source")
    shutil.copy(REPO / "pyproject.toml", source)
    for package in PACKAGES:
        shutil.copytree(
            REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    (built,) = out.glob("*.whl")
    return built


def _data_files(package: str) -> set[str]:
    """Files of a package that are not Python source: what the code reads at run time."""
    root = REPO / package
    return {
        path.relative_to(REPO).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc", ".md")
        and "__pycache__" not in path.parts
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_holds_every_data_file_of_the_packages(wheel, package):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = _data_files(package) - names
    assert not missing, f"add them to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_installed_service_serves_away_from_the_source_tree(wheel, tiny_model_dir, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(target),  # ahead of the repository's editable install
        "MODEL_DIR": str(tiny_model_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "RELOAD_INTERVAL_S": "0",
        "TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "service.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        ready = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                ready = httpx.get(f"{base}/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, log.read_text()[-4000:]
        page = httpx.get(f"{base}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        where = "import service, shared; print(service.__file__, shared.__file__)"
        probe = subprocess.run(
            [sys.executable, "-c", where],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.stdout.split() and all(
            Path(p).is_relative_to(target) for p in probe.stdout.split()
        ), probe.stdout + probe.stderr
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
