"""The model artifact format and registry layout, shared by the training jobs and the service.

Layout on the model volume:

    <MODEL_DIR>/<task>/<version>/model.pt        TorchScript file
    <MODEL_DIR>/<task>/<version>/metadata.json   the manifest, written last

A version is published atomically: everything is written into a hidden temporary folder beside
the target, each file is fsync'ed, the manifest (which holds the model file's sha256) is written
last, and the folder is renamed into place. Readers ignore hidden folders and trust a version only
when its manifest is complete and the checksum matches, so a half-written or tampered version is
never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    InvalidVersionError,
)
from shared.labels import TASKS

log = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
MANIFEST_FILE = "metadata.json"
SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 1_000_000
REQUIRED_FIELDS = (
    "schema_version",
    "task",
    "name",
    "version",
    "created_at",
    "model_file",
    "sha256",
    "preprocessing",
    "input",
    "output",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ArtifactInfo:
    """A verified version folder and its manifest."""

    task: str
    version: str
    path: Path
    metadata: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def name(self) -> str:
        return str(self.metadata["name"])

    @property
    def sha256(self) -> str:
        return str(self.metadata["sha256"])


def validate_task(task: str) -> str:
    """Return `task` if it is a known task. Raises InvalidVersionError otherwise."""
    if task not in TASKS:
        raise InvalidVersionError(f"unknown task; expected one of {', '.join(TASKS)}")
    return task


def validate_version(version: str) -> str:
    """Return `version` if it is a safe folder name. Raises InvalidVersionError otherwise.

    Allowed: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter or digit,
    and no '..' anywhere, so a version can never name a path outside its task folder.
    """
    if not isinstance(version, str) or not _NAME_RE.fullmatch(version) or ".." in version:
        raise InvalidVersionError(
            "version names are 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, without '..'"
        )
    return version


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def new_version_name(now: datetime | None = None) -> str:
    """A sortable, unique-enough default version name: UTC time to the second."""
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def publish_artifact(
    model_dir: Path, task: str, version: str, model_file: Path, metadata: dict[str, Any]
) -> ArtifactInfo:
    """Publish `model_file` (a TorchScript file) with `metadata` as `<model_dir>/<task>/<version>`.

    Fills in schema_version, task, version, model_file, sha256 and (if absent) created_at.
    Raises InvalidVersionError for a bad task/version name and ArtifactIntegrityError if the
    version already exists or the metadata lacks a required field.
    """
    validate_task(task)
    validate_version(version)
    task_dir = Path(model_dir) / task
    task_dir.mkdir(parents=True, exist_ok=True)
    target = task_dir / version
    if target.exists() or target.is_symlink():
        raise ArtifactIntegrityError(f"version {version} of {task} already exists")

    manifest = dict(metadata)
    manifest.update(
        schema_version=SCHEMA_VERSION,
        task=task,
        version=version,
        model_file=MODEL_FILE,
        sha256=sha256_file(Path(model_file)),
    )
    manifest.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    missing = [key for key in REQUIRED_FIELDS if key not in manifest]
    if missing:
        raise ArtifactIntegrityError(f"metadata lacks required fields: {missing}")

    staging = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=task_dir))
    try:
        with Path(model_file).open("rb") as src, (staging / MODEL_FILE).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        if sha256_file(staging / MODEL_FILE) != manifest["sha256"]:
            raise ArtifactIntegrityError("model file changed while it was being published")
        body = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
        _write_synced(staging / MANIFEST_FILE, body)  # the manifest last
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        os.rename(staging, target)  # atomic on one file system; fails if target appeared
        _fsync_dir(task_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published artifact", extra={"task": task, "version": version})
    return verify_artifact(Path(model_dir), task, version)


def verify_artifact(model_dir: Path, task: str, version: str) -> ArtifactInfo:
    """Check one version folder and return its manifest.

    Raises InvalidVersionError for an unsafe name, ArtifactNotFoundError when the folder does not
    exist, ArtifactIntegrityError when it is a symlink or leaves the volume, its manifest is
    missing, unreadable or inconsistent, or the model file's sha256 does not match.
    """
    validate_task(task)
    validate_version(version)
    root = Path(model_dir).resolve()
    folder = Path(model_dir) / task / version
    if not folder.exists() and not folder.is_symlink():
        raise ArtifactNotFoundError(f"{task} version {version} does not exist")
    if folder.is_symlink() or not folder.is_dir():
        raise ArtifactIntegrityError(f"{task} version {version} is not a plain folder")
    if not folder.resolve().is_relative_to(root):
        raise ArtifactIntegrityError(f"{task} version {version} points outside the model volume")

    manifest_path = folder / MANIFEST_FILE
    model_path = folder / MODEL_FILE
    for path in (manifest_path, model_path):
        if path.is_symlink() or not path.is_file():
            raise ArtifactIntegrityError(f"{task} version {version} lacks {path.name}")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactIntegrityError(f"{task} version {version} has an oversized manifest")
    try:
        metadata = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactIntegrityError(f"{task} version {version} has a malformed manifest") from exc
    if not isinstance(metadata, dict):
        raise ArtifactIntegrityError(f"{task} version {version} has a malformed manifest")
    missing = [key for key in REQUIRED_FIELDS if key not in metadata]
    if missing:
        raise ArtifactIntegrityError(f"{task} version {version} manifest lacks {missing}")
    if metadata["schema_version"] != SCHEMA_VERSION:
        raise ArtifactIntegrityError(f"{task} version {version} has an unknown schema version")
    if metadata["task"] != task or metadata["version"] != version:
        raise ArtifactIntegrityError(f"{task} version {version} manifest names another artifact")
    if metadata["model_file"] != MODEL_FILE:
        raise ArtifactIntegrityError(f"{task} version {version} names an unexpected model file")
    if sha256_file(model_path) != metadata["sha256"]:
        raise ArtifactIntegrityError(f"{task} version {version} fails its checksum")
    return ArtifactInfo(task=task, version=version, path=folder, metadata=metadata)


def list_versions(model_dir: Path, task: str) -> list[str]:
    """Names of the candidate version folders of a task (unverified; hidden folders skipped)."""
    validate_task(task)
    task_dir = Path(model_dir) / task
    if not task_dir.is_dir():
        return []
    names = []
    for entry in task_dir.iterdir():
        if entry.name.startswith("."):
            continue  # staging folders of a publish in progress
        try:
            names.append(validate_version(entry.name))
        except InvalidVersionError:
            if (task, entry.name) not in _REPORTED_INVALID_NAMES:  # once per name, not per poll
                _REPORTED_INVALID_NAMES.add((task, entry.name))
                log.warning(
                    "ignoring a folder with an invalid version name",
                    extra={"task": task, "folder": ascii(entry.name)[:80]},
                )
    return sorted(names)


_REPORTED_INVALID_NAMES: set[tuple[str, str]] = set()


def resolve_artifact(model_dir: Path, task: str, pinned: str | None = None) -> ArtifactInfo:
    """The pinned version, or else the newest verified one (by manifest `created_at`, then name).

    Versions that fail verification are skipped with a warning. Raises ArtifactNotFoundError
    when no verified version exists, and the errors of verify_artifact for a bad pinned version.
    """
    if pinned:
        return verify_artifact(model_dir, task, pinned)
    verified = verified_artifacts(model_dir, task)
    if not verified:
        raise ArtifactNotFoundError(f"no verified {task} model in the model directory")
    return verified[0]


def verified_artifacts(model_dir: Path, task: str) -> list[ArtifactInfo]:
    """Every verified version of a task, newest first (by manifest `created_at`, then name).

    Versions that fail verification are skipped with a warning. Raises nothing else.
    """
    verified: list[ArtifactInfo] = []
    for version in list_versions(model_dir, task):
        try:
            verified.append(verify_artifact(model_dir, task, version))
        except (ArtifactIntegrityError, ArtifactNotFoundError) as exc:
            log.warning(
                "skipping unverifiable artifact",
                extra={"task": task, "version": version, "reason": exc.message},
            )
    return sorted(
        verified, key=lambda info: (str(info.metadata["created_at"]), info.version), reverse=True
    )


# The manifest (metadata.json) of every artifact. Fields marked * are filled in by
# publish_artifact; the rest come from the training job.
#
#   schema_version*  1
#   task*            "classification" | "segmentation"
#   version*         folder name
#   model_file*      "model.pt"
#   sha256*          of model.pt
#   created_at       ISO 8601 UTC; decides which version is newest
#   name             human name of the model, e.g. "efficientnet_lite0-cls"
#   architecture     registry name of the network, e.g. "efficientnet_lite0", "attention_unet"
#   class_names      classification only: output order, e.g. ["normal", "benign", "malignant"]
#   preprocessing    Preprocessing.to_metadata()
#   input            {"channels", "height", "width", "dtype": "float32",
#                     "value_range": description, "source": "8-bit grayscale (shared.decoding)"}
#   output           classification: {"type": "logits", "shape": [K]}
#                    segmentation:   {"type": "logits", "shape": [1, H, W], "threshold": t}
#   metrics          evaluation metrics ({"validation": {...}, "test": {...}})
#   training         the training configuration (preset, epochs, optimiser, seed, ...)
#   data_fingerprint {"sha256": ..., "n_images": ..., "split_file": ...}
#   framework        {"torch": ..., "python": ...}
#   intended_use     free text; research use, not a medical device
