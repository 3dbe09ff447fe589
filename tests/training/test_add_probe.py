"""`python -m training add-probe` publishes a version again with model.pt's answers on the probe's
inputs, the source's files byte for byte."""

from __future__ import annotations

import json

import numpy as np
import torch
from test_drift_reference import TinyJoint, joint_metadata

from shared.labels import TASK_DIAGNOSIS
from shared.probe import probe_inputs, read_probe
from shared.promotion import PROMOTIONS_FILE
from shared.store import MANIFEST_FILE, publish_artifact, verify_artifact
from training import promote
from training.__main__ import main as training_main


def test_add_probe_publishes_the_source_with_model_pts_answers(tmp_path, capsys):
    model_file = tmp_path / "joint.pt"
    torch.jit.script(TinyJoint().eval()).save(str(model_file))
    models = tmp_path / "models"
    publish_artifact(models, TASK_DIAGNOSIS, "src", model_file, joint_metadata())
    assert verify_artifact(models, TASK_DIAGNOSIS, "src").probe_path is None

    argv = ["--model-dir", str(models), "--version", "src", "--new-version", "src-probe"]
    assert training_main(["add-probe", *argv, "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == "src-probe"

    source = verify_artifact(models, TASK_DIAGNOSIS, "src")
    derived = verify_artifact(models, TASK_DIAGNOSIS, "src-probe")
    assert derived.model_path.read_bytes() == source.model_path.read_bytes()
    assert derived.metadata["derived_from"]["version"] == "src"
    assert "probe" not in json.loads((source.path / MANIFEST_FILE).read_text())  # unchanged
    assert derived.probe_path is not None
    probe = read_probe(derived.probe_path)
    with torch.inference_mode():
        for batch, fixed, recorded in zip(
            probe.inputs, probe_inputs((3, 64, 64)), probe.outputs, strict=True
        ):
            np.testing.assert_array_equal(batch, fixed)
            answers = TinyJoint()(torch.from_numpy(batch))
            for r, a in zip(recorded, answers, strict=True):
                np.testing.assert_allclose(r, a.numpy(), rtol=0, atol=1e-6)
    assert promote.main("promote", [TASK_DIAGNOSIS, "src-probe", "--model-dir", str(models)]) == 0
    record = json.loads((models / PROMOTIONS_FILE).read_text())
    assert record["promoted"][TASK_DIAGNOSIS] == ["src-probe"]
