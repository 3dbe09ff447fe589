"""The headline figures of a manifest's metrics: what the promotion gate compares with its floors.

shared.promotion.gate_refusals reads them (Manifest.headline_figures) and refuses a version
whose figures are missing, come from too few images or lie below the GATE_MIN_* floors;
Manifest.from_dict refuses a manifest whose figures are not numbers in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HeadlineFigures:
    """The headline figures of `metrics`, which a promotion gate compares with its floors.

    Read from `metrics.cross_validation.plain` (pooled out-of-fold figures; a job's
    `cross_validation` section itself when it has no `plain` part) when present, else from
    `metrics.test` (a held-out split). `source` is "" when the manifest carries neither.
    """

    source: str = ""
    n_images: int | None = None
    accuracy: float | None = None
    macro_f1: float | None = None
    malignant_sensitivity: float | None = None
    lesion_dice: float | None = None


def read_headline_figures(metrics: Mapping[str, Any], problems: list[str]) -> HeadlineFigures:
    """The headline figures of `metrics` (see HeadlineFigures); each figure that is not a
    number in [0, 1] (or a count that is not a whole number) is named in `problems` and read
    as None."""
    section: object = None
    source = ""
    if isinstance(metrics.get("cross_validation"), dict):
        cv = metrics["cross_validation"]
        section, source = (
            (cv["plain"] if isinstance(cv.get("plain"), dict) else cv),
            "cross_validation",
        )
    elif isinstance(metrics.get("test"), dict):
        section, source = metrics["test"], "test"
    if not isinstance(section, dict):
        return HeadlineFigures()
    per_class = section.get("per_class")
    malignant = per_class.get("malignant") if isinstance(per_class, dict) else None
    sensitivity = section.get(
        "malignant_sensitivity", malignant.get("recall") if isinstance(malignant, dict) else None
    )
    figures = {
        "accuracy": section.get("accuracy"),
        "macro_f1": section.get("macro_f1"),
        "malignant_sensitivity": sensitivity,
        "lesion_dice": section.get("lesion_dice"),
    }
    for key, value in figures.items():
        if value is not None and not (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0.0 <= value <= 1.0
        ):
            problems.append(f"metrics.{source}: {key} must be a number in [0, 1]")
            figures[key] = None
    n_images = section.get("n")
    if n_images is None and "n_lesion_images" in section:
        parts = [section.get("n_lesion_images"), section.get("n_normal_images", 0)]
        n_images = sum(parts) if all(isinstance(p, int) for p in parts) else "?"
    if n_images is not None and (
        not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 0
    ):
        problems.append(f"metrics.{source}: the number of images must be a whole number")
        n_images = None
    return HeadlineFigures(
        source=source,
        n_images=n_images,
        **{k: None if v is None else float(v) for k, v in figures.items()},
    )
