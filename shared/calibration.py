"""Post-hoc calibration of class logits: what an artifact declares and the service applies.

A classifier's softmax is usually over-confident. Temperature scaling (Guo et al., 2017) divides
the logits by one fitted T > 0 before the softmax: the ranking, and so the label, is unchanged,
only the confidence moves. Vector scaling multiplies each class's logit by its own factor and adds
a bias (it may change the label); it is declared only when it clearly beats a temperature on
held-out data. The parameters are fitted by the training side
(`training.studies.calibration`) and travel in the artifact's manifest:

    "output": {..., "calibrated": true, "temperature": 1.7}
    "output": {..., "calibrated": true, "temperature": 1.0,
               "logit_scale": [...], "logit_bias": [...]}

for a classification artifact, and the same keys inside `output.classes` for a diagnosis one.
`uncertain_below` (optional, in the same place) is the top calibrated probability under which a
prediction is reported as uncertain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import ArtifactIntegrityError


@dataclass(frozen=True)
class Calibration:
    """logits -> calibrated logits: (logits * scale + bias) / temperature.

    The identity (T = 1, no vectors) means "not calibrated": probabilities are the raw softmax.
    """

    temperature: float = 1.0
    scale: tuple[float, ...] | None = None  # vector scaling, one factor per class
    bias: tuple[float, ...] | None = None
    calibrated: bool = False
    uncertain_below: float | None = None

    @property
    def method(self) -> str:
        if not self.calibrated:
            return "none"
        return "vector" if self.scale is not None else "temperature"

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated logits of the same shape ((K,) or (N, K)), as float64."""
        out = np.asarray(logits, dtype=np.float64)
        if self.scale is not None:
            out = out * np.asarray(self.scale) + np.asarray(self.bias or 0.0)
        return out / self.temperature

    def to_manifest(self) -> dict[str, Any]:
        """The keys this calibration adds to an output spec."""
        spec: dict[str, Any] = {"calibrated": self.calibrated, "temperature": self.temperature}
        if self.scale is not None:
            spec["logit_scale"] = list(self.scale)
            spec["logit_bias"] = list(self.bias or [0.0] * len(self.scale))
        if self.uncertain_below is not None:
            spec["uncertain_below"] = self.uncertain_below
        return spec

    @classmethod
    def from_manifest(cls, spec: dict[str, Any], n_classes: int) -> Calibration:
        """Read the keys of an output spec; absent keys mean uncalibrated.

        Raises ArtifactIntegrityError on a non-positive or non-finite temperature, vectors of
        the wrong length, or an `uncertain_below` outside [0, 1].
        """
        temperature = spec.get("temperature", 1.0)
        if not _finite(temperature) or temperature <= 0:
            raise ArtifactIntegrityError("output temperature must be a positive number")
        scale, bias = spec.get("logit_scale"), spec.get("logit_bias")
        if (scale is None) != (bias is None):
            raise ArtifactIntegrityError("logit_scale and logit_bias come together")
        if scale is not None:
            for name, vector in (("logit_scale", scale), ("logit_bias", bias)):
                if (
                    not isinstance(vector, list)
                    or len(vector) != n_classes
                    or not all(_finite(v) for v in vector)
                ):
                    raise ArtifactIntegrityError(f"{name} must hold {n_classes} numbers")
            scale, bias = tuple(float(v) for v in scale), tuple(float(v) for v in bias)
        below = spec.get("uncertain_below")
        if below is not None and (not _finite(below) or not 0.0 <= below <= 1.0):
            raise ArtifactIntegrityError("uncertain_below must lie in [0, 1]")
        calibrated = spec.get("calibrated", False)
        if not isinstance(calibrated, bool):
            raise ArtifactIntegrityError("output calibrated must be true or false")
        return cls(
            temperature=float(temperature),
            scale=scale,
            bias=bias,
            calibrated=calibrated,
            uncertain_below=None if below is None else float(below),
        )


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
