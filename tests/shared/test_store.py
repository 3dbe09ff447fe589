"""The store: a version is published whole and validated, and verified before it is trusted."""

from __future__ import annotations

import json

import pytest
from test_manifest import SHIPPED, shipped_manifests

from shared.labels import TASK_CLASSIFICATION, TASK_SEGMENTATION
from shared.manifest import STATUS_CANDIDATE, ManifestError
from shared.store import MANIFEST_FILE, list_versions, verify_artifact


def test_shipped_artifacts_verify_and_carry_a_typed_manifest():
    for path in shipped_manifests():
        task, version = path.parent.parent.name, path.parent.name
        info = verify_artifact(SHIPPED, task, version)
        assert info.manifest.version == version


def test_publish_writes_the_validated_manifest(tmp_path, publish_tiny):
    info = publish_tiny(tmp_path, TASK_CLASSIFICATION, "v1")
    written = json.loads((info.path / MANIFEST_FILE).read_text())
    assert written["status"] == STATUS_CANDIDATE
    assert written == info.manifest.to_dict()


def test_publish_refuses_an_invalid_manifest_and_writes_nothing(tmp_path, publish_tiny):
    with pytest.raises(ManifestError, match="output.shape must be"):
        publish_tiny(tmp_path, TASK_SEGMENTATION, "v1", output={"type": "logits", "shape": [3]})
    assert list_versions(tmp_path, TASK_SEGMENTATION) == []
    assert not (tmp_path / TASK_SEGMENTATION).exists()  # refused before anything was written
