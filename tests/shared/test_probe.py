"""A probe (model.pt's answers on fixed inputs) is written, read back and checked as recorded, and
the store publishes, verifies and copies it with the artifact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_manifests import classification_metadata

from shared.errors import ArtifactIntegrityError
from shared.labels import TASK_CLASSIFICATION
from shared.probe import (
    PROBE_FILE,
    largest_difference,
    probe_inputs,
    read_probe,
    write_probe,
)
from shared.store import MANIFEST_FILE, copy_artifact, publish_artifact, verify_artifact


def _answers(inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    return [[b.mean(axis=(1, 2, 3))[:, None] * [1.0, 2.0, 3.0], b[:, :1] * 2.0] for b in inputs]


def test_a_probe_reads_back_as_written(tmp_path):
    inputs = probe_inputs((3, 8, 8))
    assert [b.shape for b in inputs] == [(2, 3, 8, 8), (2, 3, 8, 8)]
    assert not inputs[0].any() and inputs[1].std() > 0.5  # zeros, then scan-like noise
    np.testing.assert_array_equal(probe_inputs((3, 8, 8))[1], inputs[1])  # fixed, not random
    write_probe(tmp_path / PROBE_FILE, inputs, _answers(inputs))
    probe = read_probe(tmp_path / PROBE_FILE)
    assert len(probe.inputs) == 2
    for batch, expected in zip(probe.inputs, inputs, strict=True):
        np.testing.assert_array_equal(batch, expected)
        assert batch.dtype == np.float32
    for recorded, expected in zip(probe.outputs, _answers(inputs), strict=True):
        assert len(recorded) == 2
        for r, e in zip(recorded, expected, strict=True):
            np.testing.assert_array_equal(r, e.astype(np.float32))


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"x0": np.zeros((1, 3))}, "lacks outputs of batch 0"),
        ({"x1": np.zeros((1, 3)), "y1_0": np.zeros(1)}, "no numbered input batches"),
        ({"x0": np.zeros(1), "y0_0": np.zeros(1), "notes": np.zeros(1)}, "other than inputs"),
        ({"x0": np.zeros(1), "y0_1": np.zeros(1)}, "lacks outputs of batch 0"),
    ],
)
def test_a_file_that_is_not_a_whole_probe_is_refused(tmp_path, arrays, words):
    np.savez(tmp_path / PROBE_FILE, **arrays)
    with pytest.raises(ValueError, match=words):
        read_probe(tmp_path / PROBE_FILE)


def test_a_probe_with_pickled_objects_is_refused_unread(tmp_path):
    np.savez(tmp_path / PROBE_FILE, x0=np.zeros(1), y0_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a probe file"):
        read_probe(tmp_path / PROBE_FILE)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a probe file"):
        read_probe(tmp_path / "text.npz")


def test_largest_difference_reads_the_recorded_outputs_only():
    expected = [np.zeros((2, 3)), np.ones((2, 1, 4, 4))]
    actual = [np.full((2, 3), 0.25), np.ones((2, 1, 4, 4)) - 0.5, np.full((2,), 99.0)]
    assert largest_difference(expected, actual) == 0.5  # the third output (quality) not compared
    assert largest_difference(expected, actual[:1]) == float("inf")  # an output missing
    assert largest_difference(expected, [np.zeros((1, 3)), actual[1]]) == float("inf")  # shape


def _publish(tmp_path, tiny_model_files, version: str, probe: bool, entry: bool):
    metadata = classification_metadata()
    if entry:
        metadata["probe"] = {"batches": 2, "source": "tests"}
    probe_file = None
    if probe:
        inputs = probe_inputs((3, 64, 64))
        probe_file = tmp_path / f"{version}.npz"
        write_probe(probe_file, inputs, _answers(inputs))
    return publish_artifact(
        tmp_path / "models", TASK_CLASSIFICATION, version,
        tiny_model_files[TASK_CLASSIFICATION], metadata, probe_file=probe_file,
    )  # fmt: skip


def test_the_store_publishes_verifies_and_copies_a_probe(tmp_path, tiny_model_files):
    info = _publish(tmp_path, tiny_model_files, "v1", probe=True, entry=True)
    assert info.probe_path == info.path / PROBE_FILE
    assert info.metadata["probe"]["file"] == PROBE_FILE
    assert len(info.metadata["probe"]["sha256"]) == 64
    assert read_probe(info.probe_path).inputs[0].shape == (2, 3, 64, 64)

    copied = copy_artifact(tmp_path / "models", tmp_path / "served", TASK_CLASSIFICATION, "v1")
    assert copied.probe_path is not None
    assert copied.probe_path.read_bytes() == info.probe_path.read_bytes()

    with info.probe_path.open("r+b") as fh:  # one byte changed
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactIntegrityError, match="fails the checksum of probe.npz"):
        verify_artifact(tmp_path / "models", TASK_CLASSIFICATION, "v1")
    info.probe_path.unlink()
    with pytest.raises(ArtifactIntegrityError, match="lacks probe.npz"):
        verify_artifact(tmp_path / "models", TASK_CLASSIFICATION, "v1")


def test_an_artifact_without_a_probe_has_none(tmp_path, tiny_model_files):
    info = _publish(tmp_path, tiny_model_files, "v1", probe=False, entry=False)
    assert info.probe_path is None
    assert "probe" not in json.loads((info.path / MANIFEST_FILE).read_text())


@pytest.mark.parametrize("probe, entry", [(True, False), (False, True)])
def test_a_probe_and_its_entry_are_published_together_or_not_at_all(
    tmp_path, tiny_model_files, probe, entry
):
    with pytest.raises(ArtifactIntegrityError, match="only with it"):
        _publish(tmp_path, tiny_model_files, "v1", probe=probe, entry=entry)
    assert not (tmp_path / "models" / TASK_CLASSIFICATION / "v1").exists()
