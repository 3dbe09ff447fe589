"""The images install the project with `pip install .[extra]` (not editable) and run it away from
the source tree. These tests do the same without Docker: build the wheel the images would build,
check it holds every data file the packages read, and serve from an installed copy.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from service_process import QUIET_ENV, ServiceProcess, running_service

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
    """Files of a package that are not Python source: what the code reads at run time.

    training/reports/ is left out: it documents how the shipped models were trained (reports,
    plots, logs) and no code reads it.
    """
    root = REPO / package
    return {
        path.relative_to(REPO).as_posix()
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix not in (".py", ".pyc", ".md")
        and "__pycache__" not in path.parts
        and not path.is_relative_to(REPO / "training" / "reports")
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_wheel_holds_every_data_file_of_the_packages(wheel, package):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = _data_files(package) - names
    assert not missing, f"add them to [tool.setuptools.package-data] in pyproject.toml: {missing}"


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed into a folder of its own, as the images' virtual environment holds it."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return target


def _serving(
    installed: Path, model_dir: Path, workdir: Path, wait_for: str
) -> contextlib.AbstractContextManager[ServiceProcess]:
    """`python -m service` from the installed copy, run from `workdir`, once `wait_for` is 200."""
    env = {
        "PYTHONPATH": str(installed),  # ahead of the repository's editable install
        "MODEL_DIR": str(model_dir),
        **QUIET_ENV,
    }
    log_path = workdir / f"service-{model_dir.name}.log"
    return running_service(env, log_path, cwd=workdir, wait_for=wait_for)


def _healthcheck_command() -> list[str]:
    """The exec-form command of Dockerfile.api's HEALTHCHECK."""
    text = re.sub(r"\\\n\s*", " ", (REPO / "Dockerfile.api").read_text())
    (line,) = [x for x in text.splitlines() if x.startswith("HEALTHCHECK")]
    return json.loads(line[line.index("CMD") + 3 :])


def test_installed_service_serves_away_from_the_source_tree(installed, tiny_model_dir, tmp_path):
    with _serving(installed, tiny_model_dir, tmp_path, wait_for="/readyz") as service:
        page = httpx.get(f"{service.url}/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        where = "import service, shared; print(service.__file__, shared.__file__)"
        probe = subprocess.run(
            [sys.executable, "-c", where],
            env=service.env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert probe.stdout.split() and all(
            Path(p).is_relative_to(installed) for p in probe.stdout.split()
        ), probe.stdout + probe.stderr


def test_image_healthcheck_passes_when_ready_and_fails_when_not(
    installed, tiny_model_dir, tmp_path
):
    command = _healthcheck_command()
    assert command[0] == "python"
    command[0] = sys.executable
    with _serving(installed, tiny_model_dir, tmp_path, wait_for="/readyz") as service:
        check = subprocess.run(command, env=service.env, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stderr
    empty = tmp_path / "empty-registry"
    empty.mkdir()
    # alive but never ready
    with _serving(installed, empty, tmp_path, wait_for="/healthz") as service:
        assert httpx.get(f"{service.url}/readyz", timeout=2).status_code == 503
        check = subprocess.run(command, env=service.env, capture_output=True, timeout=30)
        assert check.returncode != 0
