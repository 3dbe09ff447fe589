"""The layering the layout promises, checked by import-linter against the contracts in
.importlinter: shared/ imports neither side; service/ and training/ never import each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    command = str(lint) if lint.is_file() else shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports (import-linter, the dev extra) is not installed")
    result = subprocess.run(
        [command, "--config", str(REPO / ".importlinter"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout
