"""The model store: publishing, verifying and listing the versions on the model volume.

Layout on the model volume:

    <MODEL_DIR>/<task>/<version>/model.pt        TorchScript file
    <MODEL_DIR>/<task>/<version>/model.onnx      optional: the same model for ONNX Runtime
                                                 (shared.variants)
    <MODEL_DIR>/<task>/<version>/probe.npz       optional: model.pt's answers on fixed inputs
                                                 (shared.probe)
    <MODEL_DIR>/<task>/<version>/metadata.json   the manifest (shared.manifest), written last
    <MODEL_DIR>/promotions.json                  which versions may serve (shared.promotion)

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
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from shared.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    InvalidVersionError,
)
from shared.manifest import (
    MODEL_FILE,
    REQUIRED_FIELDS,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    validate_task,
    validate_version,
)
from shared.probe import PROBE_FILE, PROBE_KEY, probe_record
from shared.variants import (
    GRAPH_FULL,
    RUNTIME_FILE_NAMES,
    RUNTIME_FILES,
    RuntimeVariant,
    runtime_file_name,
)

log = logging.getLogger(__name__)

MANIFEST_FILE = "metadata.json"
MAX_MANIFEST_BYTES = 1_000_000


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

    def runtime_path(self, variant: RuntimeVariant) -> Path:
        """Where `variant`'s file lies (verify_artifact has checked its sha256)."""
        return self.path / variant.file

    @property
    def sha256(self) -> str:
        return str(self.metadata["sha256"])

    @property
    def runtime_files(self) -> dict[str, Path]:
        """Each runtime file the manifest names (model.onnx, classify.onnx, ...) by its name, as
        publish_artifact takes them (verify_artifact has checked their sha256)."""
        return {v.file: self.runtime_path(v) for v in self.manifest.runtimes}

    @property
    def probe_path(self) -> Path | None:
        """The probe file (shared.probe) when the manifest records one (verify_artifact has
        checked its sha256), else None."""
        return self.path / PROBE_FILE if PROBE_KEY in self.metadata else None

    @cached_property
    def manifest(self) -> Manifest:
        """The typed manifest. Raises ManifestError when a field is missing or invalid."""
        return Manifest.from_dict(self.metadata)


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


def _copy_synced(source: Path, target: Path) -> None:
    with Path(source).open("rb") as src, Path(target).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())


def derived_metadata(info: ArtifactInfo, change: str) -> dict[str, Any]:
    """`info`'s manifest for a new version of the same files plus `change`: a new created_at,
    `derived_from` naming the source, every runtime entry without its sha256 (publish_artifact
    fills in each entry's file and sha256 again) and no version."""
    metadata = {k: v for k, v in info.metadata.items() if k != "version"}
    metadata["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    metadata["derived_from"] = {"version": info.version, "sha256": info.sha256, "change": change}
    if "runtimes" in metadata:
        entries = metadata["runtimes"]
        metadata["runtimes"] = [{k: v for k, v in e.items() if k != "sha256"} for e in entries]
    return metadata


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def publish_artifact(
    model_dir: Path,
    task: str,
    version: str,
    model_file: Path,
    metadata: Mapping[str, Any],
    runtime_files: Mapping[str, Path] | None = None,
    probe_file: Path | None = None,
) -> ArtifactInfo:
    """Publish `model_file` (a TorchScript file) with `metadata` as `<model_dir>/<task>/<version>`.

    Fills in schema_version, task, version, model_file, sha256, (if absent) created_at and (if
    absent) status, validates the result as a Manifest and writes its `to_dict()`.
    `runtime_files` maps the file name of each entry of the metadata's `runtimes` list
    (runtime_file_name: model.onnx, classify.onnx, ...; a runtime's name stands for its full fp32
    graph) to the file to copy in; the entry's `file` and sha256 are filled in. `probe_file`
    (shared.probe) is copied in as probe.npz and the manifest's `probe` entry (which the metadata
    must then hold, and only then) gets its `file` and sha256. The version is a candidate: it
    serves only once promoted (shared.promotion). Raises InvalidVersionError for a bad
    task/version name, ManifestError (an ArtifactIntegrityError) for an invalid manifest, and
    ArtifactIntegrityError if the version already exists (or a probe comes without its entry, or
    an entry without its probe).
    """
    validate_task(task)
    validate_version(version)
    task_dir = Path(model_dir) / task
    target = task_dir / version
    if target.exists() or target.is_symlink():
        raise ArtifactIntegrityError(f"version {version} of {task} already exists")

    fields_in = dict(metadata)
    fields_in.update(
        schema_version=SCHEMA_VERSION,
        task=task,
        version=version,
        model_file=MODEL_FILE,
        sha256=sha256_file(Path(model_file)),
    )
    fields_in.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    runtime_files = {
        RUNTIME_FILES.get(name, name): Path(path) for name, path in (runtime_files or {}).items()
    }
    entries = [dict(e) if isinstance(e, Mapping) else e for e in fields_in.get("runtimes", [])]
    named = set()
    for entry in entries:
        if isinstance(entry, dict):
            try:
                entry["file"] = runtime_file_name(
                    entry.get("runtime"), entry.get("graph", GRAPH_FULL),
                    entry.get("precision", "fp32"),
                )  # fmt: skip
            except ValueError as exc:
                raise ManifestError([str(exc)]) from exc
            named.add(entry["file"])
    if set(runtime_files) != named:
        raise ArtifactIntegrityError(
            f"runtime files {sorted(runtime_files)} do not match the manifest's runtimes "
            f"{sorted(named)}"
        )
    for entry in entries:
        entry["sha256"] = sha256_file(runtime_files[entry["file"]])
    if entries:
        fields_in["runtimes"] = entries
    if (PROBE_KEY in fields_in) != (probe_file is not None):
        raise ArtifactIntegrityError(
            "a probe file is published with the manifest's probe entry, and only with it"
        )
    if probe_file is not None:
        if not isinstance(fields_in[PROBE_KEY], Mapping):
            raise ManifestError([f"the manifest's {PROBE_KEY} entry must be an object"])
        fields_in[PROBE_KEY] = {
            **fields_in[PROBE_KEY],
            "file": PROBE_FILE,
            "sha256": sha256_file(Path(probe_file)),
        }
    manifest = Manifest.from_dict(fields_in)  # an invalid manifest is never written
    task_dir.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=task_dir))
    try:
        _copy_synced(Path(model_file), staging / MODEL_FILE)
        if sha256_file(staging / MODEL_FILE) != manifest.sha256:
            raise ArtifactIntegrityError("model file changed while it was being published")
        for variant in manifest.runtimes:
            _copy_synced(runtime_files[variant.file], staging / variant.file)
            if sha256_file(staging / variant.file) != variant.sha256:
                raise ArtifactIntegrityError(f"{variant.file} changed while it was being published")
        if probe_file is not None:
            _copy_synced(Path(probe_file), staging / PROBE_FILE)
            if sha256_file(staging / PROBE_FILE) != fields_in[PROBE_KEY]["sha256"]:
                raise ArtifactIntegrityError(f"{PROBE_FILE} changed while it was being published")
        body = json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode() + b"\n"
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


def copy_artifact(source_dir: Path, model_dir: Path, task: str, version: str) -> ArtifactInfo:
    """Copy a verified version from another model directory (e.g. runs/candidate-models) into
    `model_dir`, byte for byte and atomically (staged in a hidden folder, manifest last, renamed).

    A version already in `model_dir` with the same model file is left as it is. Raises the
    errors of verify_artifact for the source, and ArtifactIntegrityError when `model_dir` holds
    the version with another model file.
    """
    source = verify_artifact(source_dir, task, version)
    task_dir = Path(model_dir) / task
    target = task_dir / version
    if target.exists() or target.is_symlink():
        existing = verify_artifact(model_dir, task, version)
        if existing.sha256 != source.sha256:
            raise ArtifactIntegrityError(f"{task} version {version} exists with another model")
        return existing
    task_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".copy-{version}-", dir=task_dir))
    try:
        runtime_files = [v.file for v in source.manifest.runtimes]
        probe = [PROBE_FILE] if source.probe_path is not None else []
        for name in (MODEL_FILE, *runtime_files, *probe, MANIFEST_FILE):  # the manifest last
            _copy_synced(source.path / name, staging / name)
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        os.rename(staging, target)
        _fsync_dir(task_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return verify_artifact(model_dir, task, version)


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
    _verify_runtime_files(folder, metadata, f"{task} version {version}")
    _verify_probe_file(folder, metadata, f"{task} version {version}")
    return ArtifactInfo(task=task, version=version, path=folder, metadata=metadata)


def _verify_runtime_files(folder: Path, metadata: Mapping[str, Any], what: str) -> None:
    """Each file the manifest's `runtimes` names must be a plain file with its sha256."""
    entries = metadata.get("runtimes", [])
    if not isinstance(entries, list):
        raise ArtifactIntegrityError(f"{what} has a malformed runtimes list")
    for entry in entries:
        name = entry.get("file") if isinstance(entry, dict) else None
        if name not in RUNTIME_FILE_NAMES:
            raise ArtifactIntegrityError(f"{what} names an unexpected runtime file")
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ArtifactIntegrityError(f"{what} lacks {name}")
        if sha256_file(path) != entry.get("sha256"):
            raise ArtifactIntegrityError(f"{what} fails the checksum of {name}")


def _verify_probe_file(folder: Path, metadata: Mapping[str, Any], what: str) -> None:
    """The probe file the manifest names (if it names one) must be a plain file with its
    sha256."""
    try:
        entry = probe_record(metadata)
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{what}: {exc}") from exc
    if entry is None:
        return
    path = folder / PROBE_FILE
    if path.is_symlink() or not path.is_file():
        raise ArtifactIntegrityError(f"{what} lacks {PROBE_FILE}")
    if sha256_file(path) != entry.get("sha256"):
        raise ArtifactIntegrityError(f"{what} fails the checksum of {PROBE_FILE}")


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
