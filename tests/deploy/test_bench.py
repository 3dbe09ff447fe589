"""bench/bench_service.py runs end to end (on the tiny registry, a handful of requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from tiny_manifests import (
    CLASSIFIER_PREPROCESSING,
    SEGMENTER_PREPROCESSING,
    classification_metadata,
    segmentation_metadata,
)

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.promotion import GateFloors
from shared.promotion import promote as promote_version
from shared.store import publish_artifact
from shared.variants import RUNTIME_ONNX

REPO = Path(__file__).resolve().parents[2]


def run_bench_service(args: list[str], cwd: Path) -> None:
    """bench/bench_service.py with `args` in a subprocess; it must exit 0."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_service.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-4000:]


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
    run_bench_service(args, tmp_path)
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
    # batches of 2 (--clients 2) through the bare forward: what batching alone could give
    assert report["ratios"]["classify_bare_batch_ceiling"] > 0
    assert "what batching alone can give | " in md.read_text()
    assert report["load_test"]["only_200_and_503"], report["load_test"]["statuses"]
    assert report["rss_peak_mib"] >= report["rss_after_warmup_mib"] > 0
    assert report["batch_sizes"]["classification_forwards"] > 0
    assert "/classify p50 at 1 client / best bare forward /classify needs, p50" in md.read_text()
    assert report["bare_forward_onnxruntime"] == {}  # no artifact carries model.onnx
    assert not any("onnxruntime" in key for key in report["ratios"])
    assert report["runtime"]["INFERENCE_RUNTIME"] == {"value": "auto", "from": "default"}


@pytest.fixture
def tiny_onnx_model_dir(tiny_model_files, tmp_path) -> Path:
    """The tiny models published with a model.onnx beside model.pt (exported from the TorchScript
    file). A smoke fixture, not a validation: the manifest's figures for both runtimes are made
    equal so that the variant holds; nothing measured them."""
    pytest.importorskip("onnx")  # the exporter's
    pytest.importorskip("onnxruntime")
    model_dir = tmp_path / "registry"
    for task, metadata, preprocessing, figure in (
        (TASK_CLASSIFICATION, classification_metadata(), CLASSIFIER_PREPROCESSING, "accuracy"),
        (TASK_SEGMENTATION, segmentation_metadata(), SEGMENTER_PREPROCESSING, "lesion_dice"),
    ):
        onnx_file = tmp_path / f"{task}.onnx"
        side = preprocessing.output_size
        with warnings.catch_warnings():  # the TorchScript-based exporter's deprecation notes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                torch.jit.load(str(tiny_model_files[task])),
                (torch.zeros(1, 3, side, side),),
                str(onnx_file),
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
                dynamo=False,
            )
        figures = {figure: 1.0}
        metadata["runtimes"] = [
            {"runtime": RUNTIME_ONNX, "validation": {"reference": figures, "variant": figures}}
        ]
        publish_artifact(
            model_dir, task, "v1", tiny_model_files[task], metadata, {RUNTIME_ONNX: onnx_file}
        )
        promote_version(model_dir, task, "v1", GateFloors())
    return model_dir


def test_bench_times_the_bare_onnxruntime_forward_where_the_artifacts_carry_model_onnx(
    tiny_onnx_model_dir, tmp_path
):
    """The targets are against the better bare runtime of each round; the ratios against the bare
    TorchScript and the bare ONNX Runtime forward come as extra rows, and the header says what
    the service served."""
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--model-dir", str(tiny_onnx_model_dir), "--clients", "2", "--rounds", "1",
            "--requests", "3", "--forwards", "2", "--warmup", "1", "--max-seconds", "5",
            "--load-seconds", "0", "--env", "TORCH_THREADS=1", "--json", str(out),
            "--markdown", str(md)]  # fmt: skip
    run_bench_service(args, tmp_path)
    report = json.loads(out.read_text())
    tasks = {TASK_CLASSIFICATION, TASK_SEGMENTATION}
    assert set(report["bare_forward"]) == set(report["bare_forward_onnxruntime"]) == tasks
    # a tiny model's forward can round to 0.0 ms; the loop rate shows it was timed
    assert all(fig["loop_rps"] > 0 for fig in report["bare_forward_onnxruntime"].values())
    assert set(report["ratios"]) >= {
        "classify_p50_1_client", "classify_p50_1_client_vs_onnxruntime",
        "classify_throughput_n_clients", "classify_throughput_n_clients_vs_onnxruntime",
        "diagnose_p50_1_client", "diagnose_p50_1_client_vs_onnxruntime",
        "bare_classification_torchscript_over_onnxruntime",
        "bare_segmentation_torchscript_over_onnxruntime",
    }  # fmt: skip
    runtime = report["runtime"]
    assert runtime["INFERENCE_RUNTIME"] == {"value": "auto", "from": "default"}
    assert runtime["bare_runtimes"] == ["torchscript", "onnxruntime"]
    assert runtime["served"] == dict.fromkeys(tasks, "onnxruntime")  # from GET /models
    assert all(v["holds"] for v in runtime["model_onnx"].values())
    assert "classify_p50_1_client_vs_torchscript" in report["ratios"]
    text = md.read_text()
    assert "/classify p50 at 1 client / best bare forward /classify needs, p50" in text
    assert "/classify p50 at 1 client / bare onnxruntime forward p50" in text
    assert "/diagnose p50 at 1 client / sum of its bare onnxruntime forwards" in text
    assert "INFERENCE_RUNTIME=auto (the default)" in text


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
