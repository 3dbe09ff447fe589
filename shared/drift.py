"""Drift: what a model sees and says, binned the same way in training and in the service.

The reference distribution of a published model is a field of its manifest, `drift_reference`
(written by `python -m training drift-reference`, which publishes a NEW version: a published
version never changes, and the manifest is as verified as the rest of it, since the model file's
checksum and the manifest are checked together by shared.store.verify_artifact):

    {"format": "busi-drift-reference/1",
     "quantities": {"<quantity>": {"edges": [e0, e1, ..., eK]}, ...},
     "sites": {"<site>": {"n_images": N, "counts": {"<quantity>": [c1, ..., cK], ...}}, ...},
     "source": {"command": "...", "data_fingerprint": {...}, "model_sha256": "..."}}

A quantity's `edges` are K+1 increasing numbers; a value falls in bin i when
edges[i] <= value < edges[i+1], the first and last bins taking everything below and above. The
quantities (QUANTITIES): each class's probability (`probability_<class>`, calibrated as served),
the out-of-distribution score of shared.quality (`ood_score`, 1 = the flagging threshold), the
served lesion area fraction (`lesion_area_fraction`: 0 when the served label is normal, as
/diagnose answers) and the analysed frame's `width` and `height` in pixels. No patient data: each
number describes pixels, never a header field.

The drift statistic is the population stability index (PSI) of a window of served values against
the reference pooled over its sites: sum over bins of (p - q) ln(p / q), with both shares floored
at PSI_FLOOR. By the usual reading, under 0.1 is stable, 0.1-0.25 a moderate shift, above 0.25 a
large one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

REFERENCE_FORMAT = "busi-drift-reference/1"
MANIFEST_FIELD = "drift_reference"
PSI_FLOOR = 1e-4

_PROBABILITY_EDGES = tuple(round(i / 10, 1) for i in range(11))
# 1 is the OOD threshold (shared.quality); in-distribution scans lie mostly under 0.6.
_OOD_EDGES = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 3.0)
_AREA_EDGES = (0.0, 1e-9, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
_SIDE_EDGES = (0.0, 256.0, 384.0, 448.0, 512.0, 576.0, 640.0, 768.0, 1024.0, 1536.0, 2048.0)

OOD_SCORE = "ood_score"
LESION_AREA = "lesion_area_fraction"
WIDTH = "width"
HEIGHT = "height"


def probability_quantity(class_name: str) -> str:
    return f"probability_{class_name}"


def default_edges(class_names: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """The bins of every quantity a model with `class_names` is watched on."""
    edges: dict[str, tuple[float, ...]] = {
        probability_quantity(name): _PROBABILITY_EDGES for name in class_names
    }
    edges.update({
        OOD_SCORE: _OOD_EDGES, LESION_AREA: _AREA_EDGES, WIDTH: _SIDE_EDGES, HEIGHT: _SIDE_EDGES,
    })  # fmt: skip
    return edges


def bin_index(edges: Sequence[float], value: float) -> int:
    """The bin of `value` (the outer bins take everything beyond the edges)."""
    k = len(edges) - 1
    i = int(np.searchsorted(np.asarray(edges, dtype=np.float64), value, side="right")) - 1
    return min(max(i, 0), k - 1)


def histogram(edges: Sequence[float], values: Iterable[float]) -> list[int]:
    counts = [0] * (len(edges) - 1)
    for value in values:
        if math.isfinite(value):
            counts[bin_index(edges, value)] += 1
    return counts


def psi(reference: Sequence[float], observed: Sequence[float]) -> float:
    """The population stability index of `observed` counts against `reference` counts (same
    bins). Raises ValueError when the lengths differ or either holds no count."""
    if len(reference) != len(observed):
        raise ValueError("reference and observed have different bins")
    ref = np.asarray(reference, dtype=np.float64)
    obs = np.asarray(observed, dtype=np.float64)
    if ref.sum() <= 0 or obs.sum() <= 0:
        raise ValueError("an empty histogram has no PSI")
    p = np.maximum(obs / obs.sum(), PSI_FLOOR)
    q = np.maximum(ref / ref.sum(), PSI_FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


class DriftReference:
    """A model's reference distributions, read from its manifest's `drift_reference`."""

    def __init__(
        self, edges: Mapping[str, Sequence[float]], sites: Mapping[str, Mapping[str, Any]]
    ) -> None:
        self.edges = {q: tuple(float(e) for e in v) for q, v in edges.items()}
        self.sites = {name: dict(site) for name, site in sites.items()}

    def pooled(self, quantity: str) -> list[int]:
        """The counts of `quantity` summed over the sites."""
        total = [0] * (len(self.edges[quantity]) - 1)
        for site in self.sites.values():
            for i, c in enumerate(site["counts"].get(quantity) or ()):
                total[i] += int(c)
        return total

    @property
    def quantities(self) -> list[str]:
        return [q for q in self.edges if sum(self.pooled(q)) > 0]

    def to_dict(self, source: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": REFERENCE_FORMAT,
            "quantities": {q: {"edges": list(e)} for q, e in self.edges.items()},
            "sites": self.sites,
            **({"source": dict(source)} if source else {}),
        }

    @classmethod
    def from_dict(cls, data: object) -> DriftReference:
        """Raises ValueError naming what is wrong when `data` is not a reference of this format."""
        if not isinstance(data, Mapping) or data.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"not a {REFERENCE_FORMAT} document")
        quantities, sites = data.get("quantities"), data.get("sites")
        if not isinstance(quantities, Mapping) or not isinstance(sites, Mapping) or not sites:
            raise ValueError("a drift reference needs `quantities` and at least one site")
        edges: dict[str, tuple[float, ...]] = {}
        for name, spec in quantities.items():
            values = spec.get("edges") if isinstance(spec, Mapping) else None
            if (
                not isinstance(values, list)
                or len(values) < 2
                or not all(isinstance(v, int | float) for v in values)
                or any(b <= a for a, b in zip(values, values[1:], strict=False))
            ):
                raise ValueError(f"quantity {name}: edges must be 2 or more increasing numbers")
            edges[str(name)] = tuple(float(v) for v in values)
        for site, body in sites.items():
            counts = body.get("counts") if isinstance(body, Mapping) else None
            if not isinstance(counts, Mapping):
                raise ValueError(f"site {site}: no counts")
            for name, row in counts.items():
                if name not in edges:
                    raise ValueError(f"site {site}: counts of an unknown quantity {name}")
                if (
                    not isinstance(row, list)
                    or len(row) != len(edges[name]) - 1
                    or not all(isinstance(c, int) and c >= 0 for c in row)
                ):
                    raise ValueError(f"site {site}: {name} needs {len(edges[name]) - 1} counts")
        return cls(edges, sites)

    @classmethod
    def from_values(
        cls,
        class_names: Sequence[str],
        per_site: Mapping[str, Mapping[str, Sequence[float]]],
    ) -> DriftReference:
        """Bin `{site: {quantity: values}}` with the default edges."""
        edges = default_edges(class_names)
        sites = {}
        for site, values in per_site.items():
            counts = {q: histogram(e, values.get(q, ())) for q, e in edges.items()}
            n = max((sum(c) for c in counts.values()), default=0)
            sites[site] = {"n_images": n, "counts": counts}
        return cls(edges, sites)
