"""Is this a breast-ultrasound scan like the ones the models learnt from? An image-statistics check.

The served models return only class and mask logits, so the check works from what every request
has: the decoded grayscale frame, with its dark borders trimmed (`content_box`). It describes the
frame by statistics that set B-mode ultrasound apart from photographs, CT / MR slices, test
patterns, blank or noise images (speckle texture, the grey-level histogram, dark and saturated
areas, edge density, the depth profile) and measures how far they lie from the training scans:
the Mahalanobis distance to the mean of the training scans' statistics, with a shrunk
covariance. A frame is flagged when that distance is above a threshold set on the training scans
(a high quantile of their own distances). The frame's shape and margins are left out on purpose:
BUSI's images are square crops without margins, and a 4:3 export from another scanner must not be
flagged for its format alone.

The fitted parameters (names, mean, precision matrix, threshold) live in a small versioned JSON
file (`DEFAULT_DETECTOR_FILE`), written by `python -m training ood` and read by the service.
`score` is reported in units of the threshold: above 1 is flagged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.preprocessing import content_box

DETECTOR_FORMAT = "busi-image-stats-ood/1"
DEFAULT_DETECTOR_FILE = Path(__file__).with_name("quality_detector.json")
_SIDE = 128  # statistics are taken on the content box resized to this square

FEATURE_NAMES: tuple[str, ...] = (
    "mean",
    "std",
    "skewness",
    "dark_fraction",
    "bright_fraction",
    "histogram_entropy",
    "grey_levels_used",
    "edge_density",
    "laplacian_ratio",
    "speckle_cv",
    "lag1_correlation",
    "lag4_correlation",
    "depth_profile",
    "row_column_anisotropy",
)

# What a clinician reads when one statistic is far out (|z| above _REASON_Z) on a flagged image.
_REASONS = {
    "mean": "overall brightness unlike an ultrasound scan",
    "std": "contrast unlike an ultrasound scan",
    "skewness": "grey-level distribution unlike an ultrasound scan",
    "dark_fraction": "amount of black area unlike an ultrasound scan",
    "bright_fraction": "many saturated (white) pixels",
    "histogram_entropy": "too few or too evenly spread grey levels",
    "grey_levels_used": "too few distinct grey levels (blank, drawing or test pattern)",
    "edge_density": "edge content unlike ultrasound speckle",
    "laplacian_ratio": "fine texture unlike ultrasound speckle",
    "speckle_cv": "local texture unlike ultrasound speckle",
    "lag1_correlation": "pixel-to-pixel texture unlike ultrasound speckle (noise or flat areas)",
    "lag4_correlation": "texture grain unlike ultrasound speckle",
    "depth_profile": "brightness does not vary with depth as in an ultrasound scan",
    "row_column_anisotropy": "structure unlike an ultrasound scan",
}
_REASON_Z = 4.0
_FALLBACK_REASON = "image statistics unlike the breast-ultrasound scans the models learnt from"


def image_statistics(pixels: np.ndarray) -> np.ndarray:
    """The FEATURE_NAMES statistics of one (H, W) uint8 grayscale frame, as float64."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("expected a (H, W) uint8 grayscale image")
    top, left, ch, cw = content_box(pixels)
    crop = pixels[top : top + ch, left : left + cw]
    small = Image.fromarray(np.ascontiguousarray(crop)).resize(
        (_SIDE, _SIDE), Image.Resampling.BILINEAR
    )
    x = np.asarray(small, dtype=np.float64) / 255.0
    mean, std = float(x.mean()), float(x.std())
    centred = x - mean
    skewness = float((centred**3).mean() / (std**3 + 1e-6))
    hist = np.bincount(crop.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    coarse = p.reshape(32, 8).sum(axis=1)
    entropy = float(-(coarse[coarse > 0] * np.log2(coarse[coarse > 0])).sum())
    gy, gx = np.gradient(x)
    grad = np.hypot(gx, gy)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    blocks = x.reshape(16, 8, 16, 8).transpose(0, 2, 1, 3).reshape(256, 64)
    bright_blocks = blocks.mean(axis=1) > 0.05
    speckle_cv = (
        float(np.median(blocks[bright_blocks].std(axis=1) / blocks[bright_blocks].mean(axis=1)))
        if bright_blocks.any()
        else 0.0
    )
    rows, cols = x.mean(axis=1), x.mean(axis=0)
    third = _SIDE // 3
    depth = float(rows[:third].mean() - rows[-third:].mean())
    features = [
        mean,
        std,
        skewness,
        float((x < 0.06).mean()),
        float((x > 0.94).mean()),
        entropy,
        float(np.count_nonzero(hist)) / 256.0,
        float((grad > 0.1).mean()),
        float(np.log((lap.std() + 1e-4) / (std + 1e-4))),
        speckle_cv,
        _lag_correlation(x, 1),
        _lag_correlation(x, 4),
        depth,
        float(np.log((rows.std() + 1e-4) / (cols.std() + 1e-4))),
    ]
    return np.asarray(features, dtype=np.float64)


def _lag_correlation(x: np.ndarray, lag: int) -> float:
    """Mean of the horizontal and vertical correlation of the image with itself shifted by lag."""
    values = []
    for a, b in ((x[:, :-lag], x[:, lag:]), (x[:-lag, :], x[lag:, :])):
        a, b = a - a.mean(), b - b.mean()
        denom = np.sqrt((a * a).sum() * (b * b).sum())
        values.append(float((a * b).sum() / denom) if denom > 1e-12 else 1.0)
    return float(np.mean(values))


@dataclass(frozen=True)
class Quality:
    """The verdict on one frame: `score` is the distance in units of the threshold."""

    in_distribution: bool
    score: float
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class OodDetector:
    """Mahalanobis distance of a frame's statistics to those of the training scans."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,) standard deviations, for the per-feature z-scores behind reasons
    precision: np.ndarray  # (D, D) inverse of the shrunk covariance of the standardised features
    threshold: float  # on the distance
    version: str = "unfitted"
    feature_names: tuple[str, ...] = FEATURE_NAMES

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        quantile: float = 0.995,
        shrinkage: float = 0.1,
        version: str = "unfitted",
    ) -> OodDetector:
        """Fit on the (N, D) statistics of in-distribution frames; the threshold is their own
        `quantile` distance. Raises ValueError with fewer than D + 2 frames."""
        features = np.asarray(features, dtype=np.float64)
        n, d = features.shape
        if n < d + 2:
            raise ValueError(f"need at least {d + 2} frames to fit, got {n}")
        mean = features.mean(axis=0)
        scale = np.maximum(features.std(axis=0), 1e-3)  # a constant feature must not explode
        z = (features - mean) / scale
        cov = np.cov(z, rowvar=False)
        cov = (1 - shrinkage) * cov + shrinkage * np.eye(d)
        precision = np.linalg.inv(cov)
        detector = cls(mean, scale, precision, threshold=1.0, version=version)
        distances = detector.distances(features)
        threshold = float(np.quantile(distances, quantile))
        return cls(mean, scale, precision, threshold, version)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distances of (N, D) statistics."""
        z = (np.atleast_2d(features) - self.mean) / self.scale
        return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", z, self.precision, z), 0.0))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distances in units of the threshold: above 1 is out of distribution."""
        return self.distances(features) / self.threshold

    def assess(self, pixels: np.ndarray) -> Quality:
        """The verdict on one (H, W) uint8 frame."""
        features = image_statistics(pixels)
        score = float(self.scores(features)[0])
        if not np.isfinite(score):
            score = float("inf")
        if score <= 1.0:
            return Quality(True, round(score, 4), ())
        z = np.abs((features - self.mean) / self.scale)
        order = [i for i in np.argsort(-z) if z[i] > _REASON_Z][:3]
        reasons = tuple(_REASONS[self.feature_names[i]] for i in order) or (_FALLBACK_REASON,)
        return Quality(False, round(min(score, 1e6), 4), reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DETECTOR_FORMAT,
            "version": self.version,
            "feature_names": list(self.feature_names),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "precision": self.precision.tolist(),
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OodDetector:
        """Raises ValueError when the file is of another format or its features differ."""
        if data.get("format") != DETECTOR_FORMAT:
            raise ValueError(f"not a {DETECTOR_FORMAT} detector file")
        if tuple(data.get("feature_names", ())) != FEATURE_NAMES:
            raise ValueError("the detector was fitted on other image statistics")
        d = len(FEATURE_NAMES)
        mean = np.asarray(data["mean"], dtype=np.float64)
        scale = np.asarray(data["scale"], dtype=np.float64)
        precision = np.asarray(data["precision"], dtype=np.float64)
        threshold = float(data["threshold"])
        if mean.shape != (d,) or scale.shape != (d,) or precision.shape != (d, d):
            raise ValueError("detector arrays have the wrong shapes")
        if not threshold > 0 or not (scale > 0).all():
            raise ValueError("detector threshold and scales must be positive")
        return cls(mean, scale, precision, threshold, str(data.get("version", "")))

    def save(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)


def load_detector(path: Path = DEFAULT_DETECTOR_FILE) -> OodDetector:
    """Read a detector file. Raises OSError when unreadable, ValueError when invalid."""
    return OodDetector.from_json(json.loads(Path(path).read_text()))


# --- the check on the model's own features ------------------------------------------------------

FEATURE_REASON = "the model's features of this image are unlike those of the scans it learnt from"
FEATURE_QUALITY_OUTPUT = "quality"
"""The name of the graph output that carries the score (units of the threshold: above 1 is out
of distribution) in a runtime file that computes the check (training.export_onnx)."""


@dataclass(frozen=True)
class FeatureOodDetector:
    """Mahalanobis distance of a frame's pooled encoder features to the training sites'.

    The served network's encoder already reduces every frame to a vector (the pooled deepest
    features its class head reads); frames unlike the training scans land far from theirs. The
    features are standardised, their covariance shrunk towards the identity, and the distance is
    `|(f - mean) @ whiten|` with `whiten @ whiten.T` the precision matrix of the raw features: one
    small matrix product, which the export bakes into the ONNX graphs (so the check costs the
    service nothing beyond its forward). `threshold` is a high quantile of the training frames'
    out-of-fold distances (see `fit`).
    """

    mean: np.ndarray  # (D,)
    whiten: np.ndarray  # (D, D)
    threshold: float

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        folds: np.ndarray | None = None,
        sites: np.ndarray | None = None,
        quantile: float = 0.99,
        shrinkage: float = 0.1,
    ) -> FeatureOodDetector:
        """Fit on (N, D) features of in-distribution frames.

        With `folds` (a group-aware fold per frame), the threshold is the `quantile` of the
        frames' out-of-fold distances (each fold scored by a detector fitted without it), the
        highest over `sites` (one per frame; default: one site): a frame the detector never saw
        lies farther than the ones it was fitted on, and a smaller site must not be flagged more
        for being outnumbered. Without folds, the quantile of the frames' own distances. Raises
        ValueError with fewer than 2 frames or features that are not finite.
        """
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError("need an (N, D) array of at least 2 frames' features")
        if not np.isfinite(features).all():
            raise ValueError("features must be finite")
        d = features.shape[1]
        mean = features.mean(axis=0)
        scale = np.maximum(features.std(axis=0), 1e-6)
        cov = np.cov((features - mean) / scale, rowvar=False)
        cov = (1 - shrinkage) * cov + shrinkage * np.eye(d)
        # precision of the standardised features = L L^T; of the raw ones diag(1/s) L L^T diag(1/s)
        lower = np.linalg.cholesky(np.linalg.inv(cov))
        unit = cls(mean, lower / scale[:, None], 1.0)
        if folds is None:
            distances = unit.distances(features)
        else:
            folds = np.asarray(folds)
            distances = np.zeros(len(features))
            for fold in np.unique(folds):
                held = folds == fold
                fitted = cls.fit(features[~held], quantile=0.5, shrinkage=shrinkage)
                distances[held] = fitted.distances(features[held])
        site_of = np.zeros(len(features)) if sites is None else np.asarray(sites)
        threshold = max(
            float(np.quantile(distances[site_of == site], quantile)) for site in np.unique(site_of)
        )
        return cls(unit.mean, unit.whiten, max(threshold, 1e-12))

    def distances(self, features: np.ndarray) -> np.ndarray:
        z = (np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean) @ self.whiten
        return np.sqrt((z * z).sum(axis=1))

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Distances in units of the threshold: above 1 is out of distribution."""
        return self.distances(features) / self.threshold


def feature_quality(score: float) -> Quality:
    """The verdict from a score of FeatureOodDetector (as a graph computes it)."""
    score = float(score) if np.isfinite(score) else float("inf")
    if score <= 1.0:
        return Quality(True, round(score, 4), ())
    return Quality(False, round(min(score, 1e6), 4), (FEATURE_REASON,))
