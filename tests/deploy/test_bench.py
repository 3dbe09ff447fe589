"""bench/bench_service.py runs end to end (on the tiny registry, a handful of requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_prints_the_table_the_ratios_and_the_memory(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--model-dir", str(tiny_model_dir), "--clients", "2", "--requests", "5", "--warmup",
            "1", "--max-seconds", "5", "--threads", "1", "--json", str(out)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_service.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| /classify | 1 | 5 |" in result.stdout
    assert "| bare forward (classification) | 1 |" in result.stdout
    assert "/classify p50 at 1 client / bare forward p50" in result.stdout
    assert "service resident memory" in result.stdout
    report = json.loads(out.read_text())
    names = {(r["name"], r["clients"]) for r in report["results"]}
    assert {("/classify", 1), ("/segment", 2), ("/diagnose", 2)} <= names
    assert all(r["errors"] == 0 for r in report["results"])
    assert (
        report["rss_after_warmup_mib"] > 0
        and report["rss_peak_mib"] >= report["rss_after_warmup_mib"]
    )


def test_bench_forward_times_every_served_artifact(tiny_model_dir, tmp_path):
    out = tmp_path / "forward.json"
    args = ["--model-dir", str(tiny_model_dir), "--rounds", "1", "--forwards", "3", "--json",
            str(out)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_forward.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "/diagnose forward total (classifier + segmenter)" in result.stdout
    figures = json.loads(out.read_text())
    assert set(figures) == {"classification", "segmentation"}
    assert all(fig["best_p50_ms"] > 0 for fig in figures.values())
