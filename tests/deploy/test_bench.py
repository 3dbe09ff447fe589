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


def test_bench_interleaves_http_and_bare_forwards_and_the_load_test_sees_only_200_and_503(
    tiny_model_dir, tmp_path
):
    """A smoke run on the tiny models (their ratios mean nothing; nothing here is timed): the
    report has every row and ratio, and under a queue of 2 the load test gets only 200s and
    503s."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--model-dir", str(tiny_model_dir), "--clients", "2", "--rounds", "2", "--requests",
            "3", "--forwards", "2", "--warmup", "1", "--max-seconds", "5", "--load-clients", "8",
            "--load-seconds", "2", "--env", "TORCH_THREADS=1", "--env", "MAX_QUEUE=2",
            "--json", str(out), "--markdown", str(md)]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_service.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = {(r["endpoint"], r["clients"]) for r in report["http"]}
    assert rows == {(e, c) for e in ("/classify", "/segment", "/diagnose") for c in (1, 2)}
    assert all(r["errors"] == 0 for r in report["http"])
    assert set(report["bare_forward"]) == {"classification", "segmentation"}
    assert set(report["ratios"]) >= {
        "classify_p50_1_client", "classify_throughput_n_clients", "diagnose_p50_1_client",
        "startup_s",
    }  # fmt: skip
    assert all(len(v) == 2 for v in report["ratios_per_round"].values())
    assert report["load_test"]["only_200_and_503"], report["load_test"]["statuses"]
    assert report["rss_peak_mib"] >= report["rss_after_warmup_mib"] > 0
    assert report["batch_sizes"]["classification_forwards"] > 0
    assert "/classify p50 at 1 client / bare fp32 forward p50" in md.read_text()


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
