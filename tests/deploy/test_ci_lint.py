"""CI runs ruff's lint and format checks, and the tree passes both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"


def test_ci_entry_point_runs_ruff_check_and_format_check():
    script = (REPO / ".ci" / "run").read_text()
    assert "ruff check ." in script and "ruff format --check ." in script
    assert script.index("ruff") < script.index("scripts/test.sh")  # lint fails fast


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=" ".join)
def test_the_tree_passes_ruff(args):
    if not RUFF.exists():
        pytest.skip("ruff is not installed in this environment")
    result = subprocess.run([str(RUFF), *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
