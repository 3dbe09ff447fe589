"""The model card of a served version: what an integrator must know before using it, read from
its manifest.

Every block is read from what the manifest has, under the keys training writes (and a few
spellings of the ones still being settled); a block the manifest lacks is null and named in
`missing`, never invented. Only the data sets' citations and sources, which no manifest repeats,
come from a table here (`KNOWN_DATA_SETS`), keyed by site name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.drift import MANIFEST_FIELD

# The public data sets the product's models are trained on: how to cite them and where they come
# from. The manifest's `data.licences` wins; a licence is only filled in here where the data set's
# own licence file says it (BUS-BRA's LICENSE.txt); BUSI's is left to the manifest.
KNOWN_DATA_SETS: dict[str, dict[str, str]] = {
    "busi": {
        "name": "Breast Ultrasound Images Dataset (BUSI)",
        "citation": "Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound "
        "images. Data in Brief. 2020;28:104863. doi:10.1016/j.dib.2019.104863",
    },
    "bus-bra": {
        "name": "BUS-BRA",
        "licence": "the data set's LICENSE.txt: permission to use, copy, modify, merge, publish "
        "and distribute, provided every document or paper using it cites the article below",
        "citation": "Gómez-Flores W, Gregorio-Calas MJ, Coelho de Albuquerque Pereira W. BUS-BRA: "
        "A breast ultrasound dataset for assessing computer-aided diagnosis systems. Medical "
        "Physics. 2024;51(4):3110-3123. doi:10.1002/mp.16812",
    },
}

GENERAL_LIMITATIONS = (
    "Research use only; not a medical device; not for diagnosis or treatment decisions.",
    "Performance on sites, scanners, presets or populations outside `training.sites` and "
    "`training.scanners` is unknown; watch busi_drift_psi and the OOD share on your traffic.",
    "An answer on an image flagged out of distribution (`quality.in_distribution: false`) or "
    "marked uncertain is not to be relied on.",
)

_HELD_OUT_KEYS = ("held_out_sites", "held_out_site", "holdout_sites")
_SITE_KEYS = ("sites", "per_site")


def _first(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = mapping.get(key)
        if value and isinstance(value, Mapping | list):
            return value
    return None


def _scope(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The manifest's scope block: top-level `scope`, or `metrics.scope` (training.sites)."""
    for scope in (meta.get("scope"), (meta.get("metrics") or {}).get("scope")):
        if isinstance(scope, Mapping) and scope:
            return scope
    return {}


def _trained_on(scope: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """{site: {images, groups, classes, devices}} when the scope lists the sites so."""
    for key in ("trained_on", "sites"):
        value = scope.get(key)
        if isinstance(value, Mapping) and value:
            return value
    return None


def _sites(scope: Mapping[str, Any]) -> list[str] | None:
    # Not the drift reference's sites: they are the folders its command was given, which need
    # not be the ones the model was trained on.
    per_site = _trained_on(scope)
    if per_site is not None:
        return sorted(str(s) for s in per_site)
    sites = scope.get("sites")
    if isinstance(sites, list) and sites:
        return [str(s.get("name", s)) if isinstance(s, Mapping) else str(s) for s in sites]
    return None


def _scanners(scope: Mapping[str, Any]) -> Any:
    scanners = scope.get("scanners") or scope.get("devices")
    if scanners:
        return scanners
    found = {}
    for site, body in (_trained_on(scope) or {}).items():
        devices = body.get("scanners") or body.get("devices") if isinstance(body, Mapping) else None
        if devices:  # a list of names, or {name: images}
            found[str(site)] = sorted(devices) if isinstance(devices, Mapping) else devices
    return found or None


def _headline(metrics: Mapping[str, Any]) -> Any:
    """The headline evaluation: the test figures, else the cross-validation ones (per
    preprocessing variant, as training writes them)."""
    for key in ("test", "cross_validation", "validation"):
        value = metrics.get(key)
        if value:
            return {"source": key, "figures": value}
    return None


def _data(meta: Mapping[str, Any], sites: list[str] | None) -> list[dict[str, Any]] | None:
    declared = meta.get("data") if isinstance(meta.get("data"), Mapping) else {}
    licences = declared.get("licences") or declared.get("licenses") or {}
    citations = declared.get("citations") or {}
    names = sites or sorted(set(licences) | set(citations))
    if not names:
        return None
    out = []
    for site in names:
        known = KNOWN_DATA_SETS.get(site.lower(), {})
        out.append({
            "site": site,
            "name": known.get("name"),
            "licence": (licences.get(site) if isinstance(licences, Mapping) else None)
            or known.get("licence"),
            "citation": (citations.get(site) if isinstance(citations, Mapping) else None)
            or known.get("citation"),
        })  # fmt: skip
    return out


def model_card(model: Any, calibration: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card of a service.registry.LoadedModel (see the module docstring)."""
    meta: Mapping[str, Any] = model.info.metadata
    metrics = meta.get("metrics") or {}
    scope = _scope(meta)
    sites = _sites(scope)
    not_validated = scope.get("not_validated")
    fingerprint = meta.get("data_fingerprint") or {}
    card: dict[str, Any] = {
        "task": model.task,
        "name": model.name,
        "version": model.version,
        "sha256": model.info.sha256,
        "created_at": str(meta.get("created_at")),
        "architecture": meta.get("architecture"),
        "class_names": list(model.class_names) or None,
        "intended_use": meta.get("intended_use"),
        "training": {
            "sites": sites,
            "scanners": _scanners(scope),
            "per_site": _trained_on(scope),
            "validated_on": scope.get("validated_on"),
            "n_images": fingerprint.get("n_images"),
            "per_class": fingerprint.get("per_class"),
        },
        "performance": {
            "headline": _headline(metrics),
            "note": metrics.get("note"),
            "per_site": _first(metrics, _SITE_KEYS),
            "held_out_sites": _first(metrics, _HELD_OUT_KEYS),
            "held_out_scanners": _first(metrics, ("held_out_scanners",)),
        },
        "calibration": dict(calibration) if calibration is not None else None,
        "limitations": [
            *(meta.get("limitations") or ()),
            *([f"Not validated on: {not_validated}."] if isinstance(not_validated, str) else []),
            *GENERAL_LIMITATIONS,
        ],
        "data": _data(meta, sites),
        "drift_reference": bool(meta.get(MANIFEST_FIELD)),
        "derived_from": meta.get("derived_from"),
    }
    missing = [
        name
        for name, value in (
            ("intended_use", card["intended_use"]),
            ("training.sites", sites),
            ("training.scanners", card["training"]["scanners"]),
            ("performance.per_site", card["performance"]["per_site"]),
            ("performance.held_out_sites", card["performance"]["held_out_sites"]),
            ("data.licences", any(d["licence"] for d in card["data"] or ())),
        )
        if not value
    ]
    card["missing"] = missing
    return card
