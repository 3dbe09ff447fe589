"""`python -m training promote` / `demote` from the command line: the documented way to change
what serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from shared.labels import TASK_CLASSIFICATION
from shared.promotion import PROMOTIONS_FILE

REPO = Path(__file__).resolve().parents[2]


def run_training(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_promote_and_demote_through_the_training_command_line(tmp_path, publish_tiny):
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "v2", promote=False)
    publish_tiny(tmp_path, TASK_CLASSIFICATION, "smoke", promote=False,
                 training={"preset": "tiny", "smoke": True})  # fmt: skip

    done = run_training("promote", TASK_CLASSIFICATION, "v2", "--model-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "task": TASK_CLASSIFICATION,
        "serving": "v2",
        "promoted": ["v1", "v2"],
    }
    assert "promote classification version v2" in done.stderr  # logged

    refused = run_training("promote", TASK_CLASSIFICATION, "smoke", "--model-dir", str(tmp_path))
    assert refused.returncode == 1
    assert "fails the gate: it is a smoke run" in refused.stderr

    done = run_training("demote", TASK_CLASSIFICATION, "--model-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / PROMOTIONS_FILE).read_text())
    assert record["promoted"] == {TASK_CLASSIFICATION: ["v1"]}
    assert [e["action"] for e in record["history"]] == ["promote", "promote", "demote"]


def test_training_jobs_do_not_publish_into_the_served_folder_by_default():
    from training import joint

    args = joint.parse_fit_args(["--data-path", "d"])
    assert args.model_dir == Path("runs/candidate-models")
