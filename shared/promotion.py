"""Which published versions may serve: the promotion record and the gate.

Training jobs publish candidates (shared.store.publish_artifact); a candidate serves only
once it is promoted, and then only if its manifest passes the gate:

    python -m training promote <task> <version> [--model-dir D]   # gate checked, recorded
    python -m training demote <task> [<version>] [--model-dir D]  # the one before serves again

The record is `<MODEL_DIR>/promotions.json`:

    {"schema_version": 1,
     "promoted": {"classification": ["v1", "v3"], ...},   # oldest first: the last one serves,
                                                          # the ones before it are fallbacks
     "history": [{"action": "promote", "task": ..., "version": ..., "at": ..., "by": ...,
                  "reason": ...}, ...]}

It is written atomically (a temporary file, fsync'ed, renamed over the old one) under an
exclusive lock, so the service, which re-reads it at each poll, sees the old record or the new
one. The manifest of a version never changes after publishing, which is why promotion lives here
and not in the manifest.

The gate (`gate_refusals`) refuses a smoke run, a model the decoder and its preprocessing cannot
feed, a manifest of another task, and one whose headline metrics (shared.headline_figures)
are missing, measured on too few images, or below the floors. Promotion checks it with the floors
of the GATE_MIN_* environment variables; the service checks it again at load time with its own
settings, so a version promoted under lower floors is refused (and counted) there too.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.errors import ArtifactError, ArtifactIntegrityError
from shared.labels import TASK_CLASSIFICATION, TASK_DIAGNOSIS, TASK_SEGMENTATION, TASKS
from shared.manifest import Manifest, validate_task, validate_version
from shared.store import verify_artifact

log = logging.getLogger(__name__)

PROMOTIONS_FILE = "promotions.json"
PROMOTIONS_SCHEMA_VERSION = 1
MAX_PROMOTIONS_BYTES = 1_000_000
_LOCK_FILE = ".promotions.lock"

DEFAULT_MIN_ACCURACY = 0.75
DEFAULT_MIN_DICE = 0.70
DEFAULT_MIN_EVAL_IMAGES = 50
# The shipped models' headline figures, for scale: classifier test accuracy 0.78 (94 images),
# segmenter test lesion Dice 0.73 (94 images), joint model out-of-fold accuracy 0.83 and lesion
# Dice 0.71 (623 images). A 1-epoch smoke run is refused for being one, whatever its figures.

NEEDS_ACCURACY = frozenset({TASK_CLASSIFICATION, TASK_DIAGNOSIS})
NEEDS_DICE = frozenset({TASK_SEGMENTATION, TASK_DIAGNOSIS})


class PromotionRefusedError(ArtifactError):
    """A version that may not be promoted (it fails the gate), or a demotion that names a
    version that is not promoted."""

    code = "promotion_refused"


@dataclass(frozen=True)
class GateFloors:
    """The lowest headline figures a version may have and still serve."""

    min_accuracy: float = DEFAULT_MIN_ACCURACY
    min_dice: float = DEFAULT_MIN_DICE
    min_eval_images: int = DEFAULT_MIN_EVAL_IMAGES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> GateFloors:
        """The floors of the GATE_MIN_ACCURACY, GATE_MIN_DICE and GATE_MIN_EVAL_IMAGES variables
        (the service's settings of the same names); unset or empty means the default.

        Raises ValueError on a value that is not a number.
        """
        values: dict[str, Any] = {}
        for name, key, kind in (
            ("GATE_MIN_ACCURACY", "min_accuracy", float),
            ("GATE_MIN_DICE", "min_dice", float),
            ("GATE_MIN_EVAL_IMAGES", "min_eval_images", int),
        ):
            raw = environ.get(name, "").strip()
            if raw:
                values[key] = kind(raw)
        return cls(**values)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "min_accuracy": self.min_accuracy,
            "min_dice": self.min_dice,
            "min_eval_images": self.min_eval_images,
        }


@dataclass(frozen=True)
class GateRefusal:
    """One reason the gate refuses a version: a stable `reason` (a metrics label) and a message."""

    reason: str  # smoke | task | input | no_metrics | eval_images | accuracy | dice
    message: str


def gate_refusals(manifest: Manifest, floors: GateFloors, task: str) -> list[GateRefusal]:
    """Why `manifest` may not serve `task` under `floors`; [] when it passes the gate."""
    refusals: list[GateRefusal] = []
    if manifest.task != task:
        refusals.append(GateRefusal("task", f"it is a {manifest.task} model, not a {task} one"))
    if manifest.smoke:
        refusals.append(GateRefusal("smoke", "it is a smoke run"))
    refusals += [GateRefusal("input", problem) for problem in manifest.input_problems()]
    figures = manifest.headline_figures
    if not figures.source:
        refusals.append(
            GateRefusal("no_metrics", "its manifest has no test or cross-validation metrics")
        )
        return refusals
    if figures.n_images is None or figures.n_images < floors.min_eval_images:
        count = "an unknown number of" if figures.n_images is None else figures.n_images
        refusals.append(
            GateRefusal(
                "eval_images",
                f"its {figures.source} metrics come from {count} images, fewer than "
                f"GATE_MIN_EVAL_IMAGES={floors.min_eval_images}",
            )
        )
    checks = (
        ("accuracy", NEEDS_ACCURACY, figures.accuracy, floors.min_accuracy, "GATE_MIN_ACCURACY"),
        ("dice", NEEDS_DICE, figures.lesion_dice, floors.min_dice, "GATE_MIN_DICE"),
    )
    for reason, tasks, value, floor, setting in checks:
        if manifest.task not in tasks:
            continue
        if value is None:
            refusals.append(GateRefusal(reason, f"its {figures.source} metrics lack {reason}"))
        elif value < floor:
            refusals.append(
                GateRefusal(
                    reason, f"its {figures.source} {reason} {value:.3f} is below {setting}={floor}"
                )
            )
    return refusals


# --- the promotion record ----------------------------------------------------------------------


@dataclass(frozen=True)
class Promotions:
    """The promotions record: per task the promoted versions, oldest first, and the history."""

    promoted: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    history: tuple[Mapping[str, Any], ...] = ()

    def stack(self, task: str) -> tuple[str, ...]:
        """The promoted versions of `task`, oldest first; the last one is to serve."""
        return tuple(self.promoted.get(task, ()))

    def serving(self, task: str) -> str | None:
        stack = self.stack(task)
        return stack[-1] if stack else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": PROMOTIONS_SCHEMA_VERSION,
            "promoted": {task: list(self.stack(task)) for task in TASKS if self.stack(task)},
            "history": [dict(entry) for entry in self.history],
        }

    @classmethod
    def from_dict(cls, data: object) -> Promotions:
        """Read a record. Raises ArtifactIntegrityError when it is malformed."""
        if not isinstance(data, dict) or data.get("schema_version") != PROMOTIONS_SCHEMA_VERSION:
            raise ArtifactIntegrityError(
                f"the promotions record is not a schema {PROMOTIONS_SCHEMA_VERSION} record"
            )
        promoted = data.get("promoted", {})
        history = data.get("history", [])
        if not isinstance(promoted, dict) or not isinstance(history, list):
            raise ArtifactIntegrityError("the promotions record is malformed")
        stacks: dict[str, tuple[str, ...]] = {}
        for task, versions in promoted.items():
            validate_task(task)
            if not isinstance(versions, list) or len(set(versions)) != len(versions):
                raise ArtifactIntegrityError(f"the promotions record's {task} list is malformed")
            stacks[task] = tuple(validate_version(v) for v in versions)
        if not all(isinstance(entry, dict) for entry in history):
            raise ArtifactIntegrityError("the promotions record's history is malformed")
        return cls(promoted=stacks, history=tuple(history))


def read_promotions(model_dir: Path) -> Promotions | None:
    """The record of `model_dir`, or None when it has none.

    Raises ArtifactIntegrityError when it is unreadable, oversized or malformed.
    """
    path = Path(model_dir) / PROMOTIONS_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ArtifactIntegrityError("the promotions record is not a plain file")
    if path.stat().st_size > MAX_PROMOTIONS_BYTES:
        raise ArtifactIntegrityError("the promotions record is oversized")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactIntegrityError("the promotions record is not readable JSON") from exc
    return Promotions.from_dict(data)


def _write_promotions(model_dir: Path, record: Promotions) -> None:
    body = json.dumps(record.to_dict(), indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".promotions-", suffix=".json", dir=model_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, Path(model_dir) / PROMOTIONS_FILE)  # atomic: readers see old or new
        dir_fd = os.open(model_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container uid without a passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _change(
    model_dir: Path, task: str, action: str, version: str, reason: str, update: Any
) -> Promotions:
    """Read-modify-write the record under an exclusive lock; `update(stack)` gives the new stack."""
    model_dir = Path(model_dir)
    with (model_dir / _LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two promotions at once: one waits for the other
        record = read_promotions(model_dir) or Promotions()
        stack = update(record.stack(task))
        entry = {
            "action": action,
            "task": task,
            "version": version,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "by": _who(),
            "previous": record.serving(task),
            "serving": stack[-1] if stack else None,
        }
        if reason:
            entry["reason"] = reason
        new = Promotions(
            promoted={**record.promoted, task: tuple(stack)}, history=(*record.history, entry)
        )
        _write_promotions(model_dir, new)
    log.info(
        "%s %s version %s in %s: %s now serves (was %s)",
        action, task, version, model_dir, entry["serving"], entry["previous"],
        extra={"task": task, "version": version, "action": action},
    )  # fmt: skip
    return new


def promote(
    model_dir: Path, task: str, version: str, floors: GateFloors, *, reason: str = ""
) -> Promotions:
    """Make `version` the one that serves `task` (the one serving before becomes its fallback).

    Raises the errors of verify_artifact for a missing or unverifiable version, ManifestError for
    an invalid manifest, and PromotionRefusedError listing every reason the gate refuses it.
    """
    validate_task(task)
    info = verify_artifact(model_dir, task, version)
    refusals = gate_refusals(info.manifest, floors, task)
    if refusals:
        raise PromotionRefusedError(
            f"{task} version {version} fails the gate: " + "; ".join(r.message for r in refusals)
        )
    return _change(
        model_dir,
        task,
        "promote",
        version,
        reason,
        lambda stack: (*(v for v in stack if v != version), version),
    )


def demote(
    model_dir: Path, task: str, version: str | None = None, *, reason: str = ""
) -> Promotions:
    """Take `version` (default: the one serving) out of `task`'s promotions; the version promoted
    before it serves again, or, when none was, nothing serves `task`.

    Raises PromotionRefusedError when `version` is not promoted.
    """
    validate_task(task)
    record = read_promotions(model_dir) or Promotions()
    target = version or record.serving(task)
    if target is None or target not in record.stack(task):
        raise PromotionRefusedError(
            f"{task} version {target} is not promoted"
            if target
            else f"no {task} version is promoted"
        )

    def without(stack: tuple[str, ...]) -> tuple[str, ...]:
        if target not in stack:  # demoted meanwhile by someone else
            raise PromotionRefusedError(f"{task} version {target} is not promoted")
        return tuple(v for v in stack if v != target)

    return _change(model_dir, task, "demote", target, reason, without)
