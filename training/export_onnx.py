"""`python -m training export-onnx`: a published model again, with its network for ONNX Runtime.

    python -m training export-onnx --model-dir models --task diagnosis --version V \
        --data-path D [--cv-dir training/reports/cv/joint-lite0] [--output-model-dir M] \
        [--new-version N] [--limit N]

ONNX Runtime runs the joint network about twice as fast as TorchScript on our CPUs (issue 10,
bench/precision.py). This command takes a verified diagnosis artifact, rebuilds its network in
eager PyTorch from the manifest (the recipe in `training`) with model.pt's weights, exports it to
ONNX and validates it before publishing anything:

- With `--cv-dir` (the `fold<k>.pt` weights of `python -m training cv` for the same recipe),
  every image is scored out-of-fold by the fold model that did not train on it, once as
  TorchScript fp32 (exported as `training fit` exports) and once in ONNX Runtime (the same fold
  model exported to ONNX): accuracy, macro AUC and lesion Dice of both, with the CV report's own
  figure code (training.metrics.diagnosis_figures). Without it, the artifact's own model.pt and
  ONNX are compared on the data folder's images, which it may have been trained on: the
  validation says so.
- Either way the artifact's model.pt and its ONNX file answer the same images, and the largest
  differences of their class and mask logits and the number of images whose class differs are
  recorded.

It publishes a NEW version (model.pt byte for byte, the source manifest with `derived_from` and a
`runtimes` entry for model.onnx; shared.variants.RuntimeVariant) only when the ONNX figures lie
within shared.variants.VALIDATION_BAR of TorchScript's and the artifact's two files agree (no
class differs, no logit by more than RUNTIME_AGREEMENT_ATOL); otherwise it exits with status 1
and says why. It does not promote: `python -m training promote` stays the operator's step.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from shared import inference
from shared.calibration import Calibration
from shared.errors import ArtifactError
from shared.labels import CLASS_NAMES, TASK_DIAGNOSIS
from shared.models.joint import JointEnsemble, JointFlipAverage
from shared.onnx_runtime import OnnxSessions
from shared.postprocessing import dice_iou
from shared.preprocessing import Preprocessing
from shared.probe import PROBE_BATCH, PROBE_KEY, probe_inputs, write_probe
from shared.quality import FEATURE_QUALITY_OUTPUT, FeatureOodDetector
from shared.store import ArtifactInfo, new_version_name, publish_artifact, verify_artifact
from shared.variants import (
    GRAPH_CLASSIFY,
    GRAPH_FULL,
    GRAPHS,
    ONNX_FILE,
    RUNTIME_AGREEMENT_ATOL,
    RUNTIME_ONNX,
    VALIDATION_BAR,
    RuntimeVariant,
    runtime_file_name,
)
from training import cli

log = logging.getLogger(__name__)

ONNX_OPSET = 20  # torch.onnx's default when bench/precision.py measured the variant

Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ValidationRefused(RuntimeError):
    """The ONNX variant does not hold against TorchScript fp32, so nothing is published."""

    def __init__(self, reasons: list[str], validation: Mapping[str, Any]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons
        self.validation = validation


# --- ONNX export and ONNX Runtime -----------------------------------------------------------


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    opset: int = ONNX_OPSET,
    output_names: list[str] | None = None,
) -> bytes:
    """The ONNX file of eager `model` (eval mode), batch size dynamic: input `x`, outputs
    `output_names` (default `classes` and `masks`; a ServedGraph names its own). TorchScript
    modules do not export (their scripted interpolate); rebuild the eager network first
    (eager_model)."""
    if output_names is None:
        output_names = getattr(model, "output_names", ["classes", "masks"])
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter, the one bench/precision.py measured, warns it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            input_names=["x"],
            output_names=output_names,
            dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in output_names}},
            opset_version=opset,
            dynamo=False,
        )
    return buffer.getvalue()


def onnx_opset(data: bytes) -> int:
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load_model_from_string(data)
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


class OnnxRuntimeForward:
    """An ONNX file in ONNX Runtime's CPU provider, called like the TorchScript module, on as
    many threads as torch has at the call (a session per count: shared.onnx_runtime)."""

    def __init__(self, data: bytes) -> None:
        self.sessions = OnnxSessions(data)  # onnxruntime: pip install -e ".[train]"
        self.version = self.sessions.version

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The graph's outputs (class and mask logits first, as model.pt gives them)."""
        outputs = self.sessions.run(x.numpy(), torch.get_num_threads())
        return tuple(torch.from_numpy(o) for o in outputs)


# --- the served graphs ------------------------------------------------------------------------


def _joint_parts(served: nn.Module) -> tuple[list[nn.Module], bool]:
    """(the JointUNets inside `served`: one, or an ensemble's members; whether `served` averages
    over the mirror image). Raises ValueError for an ensemble whose members average themselves."""
    flip = isinstance(served, JointFlipAverage)
    inner = served.model if flip else served
    if not isinstance(inner, JointEnsemble):
        return [inner], flip
    members = list(inner.members)
    if any(isinstance(m, JointFlipAverage) for m in members):
        raise ValueError("an ensemble is mirror-averaged as a whole, not member by member")
    return members, flip


class QualityScore(nn.Module):
    """shared.quality.FeatureOodDetector as a graph: (N, D) features -> (N,) scores."""

    def __init__(self, detector: FeatureOodDetector) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(detector.mean, dtype=torch.float32))
        self.register_buffer("whiten", torch.as_tensor(detector.whiten, dtype=torch.float32))
        self.inv_threshold = float(1.0 / detector.threshold)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.mean) @ self.whiten
        return torch.sqrt((z * z).sum(dim=1)) * self.inv_threshold


class ServedGraph(nn.Module):
    """What a runtime file computes, from the served network's weights.

    `graph="full"`: the served network's outputs (class logits, mask logits); `"classify"`: the
    encoder and the class head only (class logits), with the mirror averaging the served
    network does. With a `detector`, both add the quality score of the pooled deepest features
    (averaged over the mirror like the logits): the features the class head reads, so the check
    costs one (D, D) product. An ensemble (shared.models.joint.JointEnsemble) averages its
    members' class logits, and its features are its members' pooled features side by side.
    """

    def __init__(
        self, served: nn.Module, graph: str = GRAPH_FULL, detector: FeatureOodDetector | None = None
    ) -> None:
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}")
        self.served = served.eval()
        self.graph = graph
        self.quality = QualityScore(detector) if detector is not None else None
        self._deepest: list[torch.Tensor] = []
        self._nets, self._flip = _joint_parts(served)
        if graph == GRAPH_FULL and detector is not None:
            for net in self._nets:
                net.encoder.register_forward_hook(self._keep_deepest)

    @property
    def output_names(self) -> list[str]:
        names = ["classes", "masks"] if self.graph == GRAPH_FULL else ["classes"]
        return names + ([FEATURE_QUALITY_OUTPUT] if self.quality is not None else [])

    def _keep_deepest(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._deepest.append(output[-1])

    def _average(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return 0.5 * (t[:n] + t[n:]) if self._flip else t

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each network's pooled deepest encoder features of x (and its mirror when served so)."""
        both = torch.cat([x, torch.flip(x, dims=[-1])], dim=0) if self._flip else x
        return [net.encode(both)[-1].mean(dim=(2, 3)) for net in self._nets]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) pooled deepest encoder features (each member's, side by side), averaged over
        the mirror when served so."""
        return self._average(torch.cat(self._pooled(x), dim=1), x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        if self.graph == GRAPH_FULL:
            self._deepest.clear()
            classes, masks = self.served(x)
            outputs: tuple[torch.Tensor, ...] = (classes, masks)
            if self.quality is not None:
                deepest = torch.cat([d.mean(dim=(2, 3)) for d in self._deepest], dim=1)
                self._deepest.clear()
                outputs += (self.quality(self._average(deepest, n)),)
            return outputs
        pooled = self._pooled(x)
        # the class head as JointUNet applies it (its dropout is the identity in eval mode),
        # averaged over the members as JointEnsemble averages them
        logits = [net.classifier(net.dropout(p)) for net, p in zip(self._nets, pooled, strict=True)]
        classes = self._average(torch.stack(logits).mean(dim=0), n)
        if self.quality is None:
            return (classes,)
        return classes, self.quality(self._average(torch.cat(pooled, dim=1), n))


# --- scoring --------------------------------------------------------------------------------


def _spec(preprocessing: Preprocessing, threshold: float) -> inference.ModelSpec:
    """A joint network's outputs, uncalibrated: the figures are the network's own."""
    return inference.ModelSpec(preprocessing, CLASS_NAMES, threshold=threshold)


def _joint_outputs(forward: Forward) -> inference.Forward:
    """A torch forward (a module, an ONNX Runtime one, a variant of the bench) as the shared
    inference path runs it: its class and mask logits, whatever it adds after them."""
    run = inference.module_forward(forward)
    return lambda batch: run(batch)[:2]


def _rows(
    start: int, found: list[inference.Findings], masks: list, labels: list, keys: list
) -> list[dict[str, Any]]:
    rows = []
    for j, finding in enumerate(found):
        i = start + j
        assert finding.mask is not None and finding.probabilities is not None
        pred = finding.mask > 0
        dice, _ = dice_iou(pred, masks[i] > 127)
        rows.append({
            "key": keys[i], "label": labels[i],
            "probs": [float(v) for v in finding.probabilities],
            "dice": float(dice), "mask_pixels": int(pred.sum()),
        })  # fmt: skip
    return rows


def score(
    forward: Forward, preprocessing: Any, images: list, masks: list, labels: list, keys: list,
    batch_size: int, threshold: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per-image rows as training.joint.evaluate_images makes them (probs, dice, mask_pixels),
    from the findings of shared.inference.predict."""
    model = inference.InferenceModel(_joint_outputs(forward), _spec(preprocessing, threshold))
    found = inference.predict(model, images, batch_size)
    return _rows(0, found, masks, labels, keys)


@dataclass
class Agreement:
    """How far two forwards of the same network lie apart on the same inputs."""

    calibration: Calibration
    n_images: int = 0
    max_abs_class_logit_diff: float = 0.0
    max_abs_mask_logit_diff: float = 0.0
    class_disagreements: int = 0

    def add(self, reference: Sequence[np.ndarray], variant: Sequence[np.ndarray]) -> None:
        ref_classes, ref_masks = (np.asarray(a, dtype=np.float64) for a in reference[:2])
        var_classes, var_masks = (np.asarray(a, dtype=np.float64) for a in variant[:2])
        self.n_images += len(ref_classes)
        self.max_abs_class_logit_diff = max(
            self.max_abs_class_logit_diff, float(np.abs(ref_classes - var_classes).max())
        )
        self.max_abs_mask_logit_diff = max(
            self.max_abs_mask_logit_diff, float(np.abs(ref_masks - var_masks).max())
        )
        # the raw label, and the one the service reports (after the manifest's calibration)
        differs = ref_classes.argmax(1) != var_classes.argmax(1)
        served = self.calibration.apply(ref_classes).argmax(1)
        differs |= served != self.calibration.apply(var_classes).argmax(1)
        self.class_disagreements += int(differs.sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_images": self.n_images,
            "max_abs_class_logit_diff": self.max_abs_class_logit_diff,
            "max_abs_mask_logit_diff": self.max_abs_mask_logit_diff,
            "class_disagreements": self.class_disagreements,
        }


@dataclass
class Images:
    """The scored images with what `score` needs of each."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    labels: list[int]
    keys: list[str]

    def pick(self, indices: list[int]) -> Images:
        return Images(*([values[i] for i in indices] for values in
                        (self.images, self.masks, self.labels, self.keys)))  # fmt: skip


def score_pair(
    reference: Forward,
    variant: Forward,
    preprocessing: Preprocessing,
    data: Images,
    threshold: float,
    agreement: Agreement,
    batch_size: int = 8,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of both forwards on the same batches (see `score`); their differences go to
    `agreement`."""
    spec = _spec(preprocessing, threshold)
    runs = (_joint_outputs(reference), _joint_outputs(variant))
    reference_rows: list[dict[str, Any]] = []
    variant_rows: list[dict[str, Any]] = []
    for start in range(0, len(data.images), batch_size):
        batch, layouts = inference.model_inputs(
            preprocessing, data.images[start : start + batch_size]
        )
        ref, var = (run(batch) for run in runs)
        agreement.add(ref, var)
        for rows, outputs in ((reference_rows, ref), (variant_rows, var)):
            found = inference.findings_of(spec, inference.split_outputs(spec.outputs, outputs),
                                          layouts)  # fmt: skip
            rows += _rows(start, found, data.masks, data.labels, data.keys)
    return reference_rows, variant_rows


def bar_figures(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The figures of VALIDATION_BAR, computed as the CV report computes them."""
    from training.metrics import diagnosis_figures

    figures = diagnosis_figures(rows)
    return {key: float(figures[key]) for key in VALIDATION_BAR}


# --- the artifact's network, eager --------------------------------------------------------------


def joint_preset(training: Mapping[str, Any]) -> Any:
    """The JointPreset an artifact was trained with: its named preset with the recipe's fields
    (the flags' overrides) applied. Raises ValueError for an unknown preset."""
    from training.joint import JointPreset, get_preset

    preset = get_preset(str(training.get("preset")))
    recipe = training.get("recipe") or training  # a manifest holds the recipe's fields flat
    names = {f.name for f in fields(JointPreset)} - {"description"}
    return replace(preset, **{k: v for k, v in recipe.items() if k in names})


def eager_network(
    preset: Any, state_dict: Mapping[str, torch.Tensor], members: int = 1
) -> nn.Module:
    """The served form of a joint recipe (flip averaging when it says so) with these weights,
    loaded strictly: one network, or with `members` > 1 the JointEnsemble of that many.
    `state_dict` holds the served module's keys or the bare network's (ensemble's)."""
    from training.joint import build_networks

    model = build_networks(preset, members)
    served: nn.Module = JointFlipAverage(model) if preset.flip_tta else model
    bare = not any(k.startswith("model.") for k in state_dict)
    (model if bare else served).load_state_dict(dict(state_dict), strict=True)
    return served.eval()


def eager_model(info: ArtifactInfo) -> tuple[nn.Module, Any]:
    """The artifact's network in eager PyTorch with model.pt's weights, and its recipe.

    Raises ValueError for a task other than diagnosis (classification and segmentation artifacts
    are not rebuilt here yet), an unknown preset, or model.pt's weights that do not fit the
    rebuilt network.
    """
    if info.task != TASK_DIAGNOSIS:
        raise ValueError(
            f"export-onnx rebuilds joint diagnosis models only; {info.task} version "
            f"{info.version} is not one (its network would need its task's model builder)"
        )
    training = info.metadata.get("training") or {}
    preset = joint_preset(training)
    scripted = inference.load_module(info)
    try:
        members = int(training.get("ensemble_members") or 1)
        return eager_network(preset, scripted.state_dict(), members), preset
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or mis-shaped weights
        first = str(exc).strip().splitlines()[0][:300]
        raise ValueError(
            f"{info.task} version {info.version}: model.pt's weights do not fit the network its "
            f"manifest's recipe builds ({first})"
        ) from exc


# --- validation ------------------------------------------------------------------------------


def spread(n: int, limit: int | None) -> list[int]:
    """Indices of `limit` items spread evenly over `n` (all of them without a limit), so that a
    limited run still sees every class of a folder sorted by class."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted({int(i * n / limit) for i in range(limit)})


def validate(
    info: ArtifactInfo,
    preset: Any,
    data: Images,
    *,
    cv: tuple[Path, Mapping[str, Mapping[str, int]]] | None,
    artifact_onnx: bytes,
    batch_size: int = 8,
) -> dict[str, Any]:
    """reference / variant figures (out-of-fold with `cv` = (cv_dir, fold items), else the
    artifact's own) and the artifact's agreement; the validation dict less source and command."""
    from training.export import export_torchscript

    preprocessing = Preprocessing.from_metadata(info.metadata["preprocessing"])
    threshold = float(info.metadata["output"]["mask"]["threshold"])
    calibration = Calibration.from_manifest(info.metadata["output"]["classes"], len(CLASS_NAMES))
    example = torch.zeros((1, 3, preset.size, preset.size))
    reference_rows: list[dict[str, Any]] = []
    variant_rows: list[dict[str, Any]] = []
    fold_agreement = Agreement(calibration)
    if cv is not None:
        cv_dir, items = cv
        by_fold: dict[int, list[int]] = {}
        for i, key in enumerate(data.keys):
            by_fold.setdefault(int(items[key]["fold"]), []).append(i)
        for fold, indices in sorted(by_fold.items()):
            started = time.perf_counter()
            weights = Path(cv_dir) / f"fold{fold}.pt"
            if not weights.is_file():
                raise FileNotFoundError(f"no {weights}: fold {fold}'s images have no model")
            state = torch.load(weights, map_location="cpu", weights_only=True)
            fold_eager = eager_network(preset, state)
            scripted = export_torchscript(fold_eager, example)
            onnx = OnnxRuntimeForward(export_onnx(fold_eager, example))
            ref, var = score_pair(scripted, onnx, preprocessing, data.pick(indices), threshold,
                                  fold_agreement, batch_size)  # fmt: skip
            reference_rows += ref
            variant_rows += var
            log.info("fold %d: %d images in %.0f s", fold, len(indices),
                     time.perf_counter() - started)  # fmt: skip
    started = time.perf_counter()
    agreement = Agreement(calibration)
    artifact_pt = inference.load_module(info)
    ref, var = score_pair(artifact_pt, OnnxRuntimeForward(artifact_onnx), preprocessing, data,
                          threshold, agreement, batch_size)  # fmt: skip
    log.info("the artifact: %d images in %.0f s", len(data.keys), time.perf_counter() - started)
    if cv is None:
        reference_rows, variant_rows = ref, var
    validation: dict[str, Any] = {
        "n_images": len(reference_rows),
        "reference": bar_figures(reference_rows),
        "variant": bar_figures(variant_rows),
        "artifact_agreement": agreement.to_dict(),
    }
    if cv is not None:
        validation["fold_models_agreement"] = fold_agreement.to_dict()
    return validation


def validate_classify(
    full: bytes,
    classify: bytes,
    preprocessing: Preprocessing,
    data: Images,
    calibration: Calibration,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The classify-only graph against the full graph it was cut from, on the same images: the
    class figures of both (accuracy, macro AUC: VALIDATION_BAR's that a label has), and their
    agreement (largest class-logit and quality-score differences, images whose label differs)."""
    full_run = inference.module_forward(OnnxRuntimeForward(full))
    classify_run = inference.module_forward(OnnxRuntimeForward(classify))
    agreement = {"n_images": 0, "max_abs_class_logit_diff": 0.0, "class_disagreements": 0}
    reference_rows, variant_rows = [], []
    worst_quality: float | None = None
    for start in range(0, len(data.images), batch_size):
        batch, _ = inference.model_inputs(preprocessing, data.images[start : start + batch_size])
        ref, var = full_run(batch), classify_run(batch)
        ref_classes = ref[0].astype(np.float64)
        var_classes = var[0].astype(np.float64)
        agreement["n_images"] += len(ref_classes)
        agreement["max_abs_class_logit_diff"] = max(
            agreement["max_abs_class_logit_diff"], float(np.abs(ref_classes - var_classes).max())
        )
        differs = ref_classes.argmax(1) != var_classes.argmax(1)
        differs |= calibration.apply(ref_classes).argmax(1) != calibration.apply(
            var_classes
        ).argmax(1)
        agreement["class_disagreements"] += int(differs.sum())
        if len(ref) == 3 and len(var) == 2:  # both compute the quality score
            diff = float(np.abs(ref[2] - var[1]).max())
            worst_quality = max(worst_quality or 0.0, diff)
        for j in range(len(ref_classes)):
            i = start + j
            for rows, logits in ((reference_rows, ref_classes), (variant_rows, var_classes)):
                rows.append({"key": data.keys[i], "label": data.labels[i],
                             "probs": [float(v) for v in inference.probabilities(logits[j])],
                             "dice": float("nan"), "mask_pixels": 0})  # fmt: skip
    if worst_quality is not None:
        agreement["max_abs_quality_diff"] = worst_quality
    keys = ("accuracy", "macro_auc")
    return {
        "n_images": agreement["n_images"],
        "reference_graph": GRAPH_FULL,
        "reference": {k: v for k, v in bar_figures(reference_rows).items() if k in keys},
        "variant": {k: v for k, v in bar_figures(variant_rows).items() if k in keys},
        "agreement": agreement,
    }


def classify_refusals(validation: Mapping[str, Any]) -> list[str]:
    """Why the classify-only graph must not ship: it must give the full graph's label on every
    image and its class logits (and quality score) within RUNTIME_AGREEMENT_ATOL."""
    agreement = validation.get("agreement") or {}
    reasons = []
    if not agreement.get("n_images"):
        reasons.append("classify.onnx was not compared with model.onnx on any image")
    if agreement.get("class_disagreements", 0):
        reasons.append(
            f"classify.onnx gives another label than model.onnx on "
            f"{agreement['class_disagreements']} of {agreement['n_images']} images"
        )
    for key in ("max_abs_class_logit_diff", "max_abs_quality_diff"):
        diff = agreement.get(key, 0.0)
        if not diff <= RUNTIME_AGREEMENT_ATOL:
            reasons.append(
                f"classify.onnx's {key} from model.onnx is {diff:.2g} "
                f"(more than {RUNTIME_AGREEMENT_ATOL:g})"
            )
    return reasons


def fit_quality_check(
    eager: nn.Module,
    preprocessing: Preprocessing,
    site_paths: list[Path],
    folds_file: Path | None,
    batch_size: int = 16,
) -> tuple[FeatureOodDetector, dict[str, Any]]:
    """The quality check on the served network's own features: pooled encoder features of
    every image of the training sites' folders (training.sites) and of the non-ultrasound
    evaluation set (training.studies.ood), evaluated over the site folds and fitted on every
    image. Raises ValueError when it does not hold (the floors of
    training.studies.ood.evaluate_feature_check)."""
    from training.data import data_fingerprint, load_image
    from training.sites import DEFAULT_SITE_FOLDS, load_site_folds, scan_sites
    from training.studies.ood import FEATURE_QUANTILE, SHRINKAGE, evaluate_feature_check, ood_images

    started = time.perf_counter()
    graph = ServedGraph(eager, GRAPH_CLASSIFY)
    samples = scan_sites(site_paths)
    folds_file = folds_file or DEFAULT_SITE_FOLDS
    items = load_site_folds(folds_file, samples)
    folds = np.asarray([int(items[s.key]["fold"]) for s in samples])
    images = [load_image(s) for s in samples]
    features = pooled_features(graph, preprocessing, images, batch_size)
    ood_set = ood_images()
    ood = pooled_features(graph, preprocessing, [s.pixels for s in ood_set], batch_size)
    stats = image_statistics_figures(images, [s.site for s in samples], ood_set)
    del images
    log.info("features of %d training-site and %d non-ultrasound images in %.0f s",
             len(samples), len(ood_set), time.perf_counter() - started)  # fmt: skip
    report = evaluate_feature_check(
        features, [s.site for s in samples], folds, ood, [s.source for s in ood_set]
    )
    report.pop("held_out_scores")
    from training.runner import display_path

    # what the image-statistics check (shared.quality_detector.json) would add to this one
    caught_by_features = np.asarray(report.pop("ood_flagged_share")) >= 0.5
    stats["ood_caught_only_by_image_statistics"] = int(
        (~caught_by_features & np.asarray(stats.pop("ood_flagged"))).sum()
    )
    report["image_statistics_check"] = stats

    report["sites"] = [str(p) for p in site_paths]
    report["folds_file"] = display_path(folds_file)
    report["data_fingerprint"] = data_fingerprint(samples)["sha256"]
    if not report["holds"]:
        raise ValueError("the quality check does not hold: " + "; ".join(report["refusals"]))
    detector = FeatureOodDetector.fit(
        features, folds, np.asarray([s.site for s in samples]), FEATURE_QUANTILE, SHRINKAGE
    )
    report["threshold"] = detector.threshold
    return detector, report


def image_statistics_figures(
    images: list[np.ndarray], sites: list[str], ood_set: list[Any]
) -> dict[str, Any]:
    """The shipped image-statistics check on the same images: each site's flagged share and the
    non-ultrasound images it flags (to weigh whether it adds anything to the feature check)."""
    from shared.quality import image_statistics, load_detector

    detector = load_detector()
    scores = detector.scores(np.stack([image_statistics(p) for p in images]))
    ood_scores = detector.scores(np.stack([image_statistics(s.pixels) for s in ood_set]))
    site_of = np.asarray(sites)
    return {
        "detector_version": detector.version,
        "flagged_by_site": {
            site: float((scores[site_of == site] > 1.0).mean()) for site in sorted(set(sites))
        },
        "ood_detected": float((ood_scores > 1.0).mean()),
        "ood_flagged": (ood_scores > 1.0).tolist(),
    }


def pooled_features(
    graph: ServedGraph, preprocessing: Preprocessing, images: list[np.ndarray], batch_size: int
) -> np.ndarray:
    """(N, D) ServedGraph.features of decoded frames, preprocessed as the service does."""
    out = []
    for start in range(0, len(images), batch_size):
        batch, _ = inference.model_inputs(preprocessing, images[start : start + batch_size])
        with torch.inference_mode():
            out.append(graph.features(torch.from_numpy(batch)).numpy())
    return np.concatenate(out).astype(np.float64)


def refusals(validation: Mapping[str, Any]) -> list[str]:
    """Why the ONNX variant must not be published (none: it may).

    It must hold (shared.variants.RuntimeVariant.holds: every figure within VALIDATION_BAR of
    TorchScript fp32's) with all of VALIDATION_BAR's figures measured, and the artifact's own two
    files must agree: no class differs and no logit by more than RUNTIME_AGREEMENT_ATOL.
    """
    variant = RuntimeVariant(RUNTIME_ONNX, ONNX_FILE, "", "fp32", dict(validation))
    deltas = variant.deltas
    reasons = [
        f"{key} differs from TorchScript fp32's by {delta:+.4f} (bar {VALIDATION_BAR[key]})"
        for key, delta in deltas.items()
        if abs(delta) > VALIDATION_BAR[key]
    ]
    missing = [key for key in VALIDATION_BAR if key not in deltas]
    if missing:  # e.g. a macro AUC without every class among the images
        reasons.append(f"not measured for both runtimes: {', '.join(missing)}")
    if not variant.holds and not reasons:
        reasons.append("the variant does not hold against VALIDATION_BAR")
    agreement = validation.get("artifact_agreement") or {}
    if not agreement.get("n_images"):
        reasons.append("the artifact's model.pt and model.onnx were not compared on any image")
    if agreement.get("class_disagreements", 0):
        reasons.append(
            f"the artifact's model.onnx gives another class than its model.pt on "
            f"{agreement['class_disagreements']} of {agreement['n_images']} images"
        )
    for what in ("class", "mask"):
        diff = agreement.get(f"max_abs_{what}_logit_diff", 0.0)
        if not diff <= RUNTIME_AGREEMENT_ATOL:  # NaN fails too
            reasons.append(
                f"the artifact's {what} logits differ between model.pt and model.onnx by up to "
                f"{diff:.2g} (more than {RUNTIME_AGREEMENT_ATOL:g})"
            )
    return reasons


def derived_metadata(
    info: ArtifactInfo,
    validation: Mapping[str, Any],
    classify: Mapping[str, Any] | None = None,
    outputs: Mapping[str, list[str]] | None = None,
    quality: Mapping[str, Any] | None = None,
    probe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The source manifest with a new created_at, where it came from and the ONNX runtime
    entries: model.onnx, and classify.onnx with its `classify` validation when given; the
    quality check's record when the graphs compute it; the `probe` entry (shared.probe) when
    given (publish_artifact fills in version, files and sha256)."""
    outputs = outputs or {}
    metadata = {
        k: v
        for k, v in info.metadata.items()
        if k not in ("version", "runtimes", "quality", PROBE_KEY)
    }
    metadata["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    change = "adds model.onnx for ONNX Runtime"
    if classify is not None:
        change += ", classify.onnx (the encoder and class head only) for /classify"
    if quality is not None:
        change += ", the quality check on the encoder's features in both graphs"
    if probe is not None:
        change += ", model.pt's answers on fixed inputs for the check at load (probe.npz)"
        metadata[PROBE_KEY] = dict(probe)
    metadata["derived_from"] = {"version": info.version, "sha256": info.sha256, "change": change}
    full: dict[str, Any] = {"runtime": RUNTIME_ONNX, "precision": "fp32"}
    if GRAPH_FULL in outputs:
        full["outputs"] = outputs[GRAPH_FULL]
    metadata["runtimes"] = [{**full, "validation": dict(validation)}]
    if classify is not None:
        entry: dict[str, Any] = {"runtime": RUNTIME_ONNX, "graph": GRAPH_CLASSIFY,
                                 "precision": "fp32"}  # fmt: skip
        if GRAPH_CLASSIFY in outputs:
            entry["outputs"] = outputs[GRAPH_CLASSIFY]
        metadata["runtimes"].append({**entry, "validation": dict(classify)})
    if quality is not None:
        metadata["quality"] = {"output": FEATURE_QUALITY_OUTPUT, **quality}
    return metadata


# --- the command -----------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "export-onnx",
        "Publish a model again with the same network for ONNX Runtime, validated against "
        "TorchScript fp32 (not promoted).",
    )
    cli.add_republish_flags(parser)
    cli.add_flag(parser, "--data-path", required=True, help="the images to validate on")
    parser.add_argument(
        "--cv-dir",
        type=Path,
        default=None,
        help="fold<k>.pt of `python -m training cv` for the same recipe: validate out-of-fold "
        "(default: none; the artifact's own model on the data folder, not held out)",
    )
    cli.add_flag(
        parser,
        "--folds-file",
        default=None,
        help="of --cv-dir; none: training/splits/busi-5fold.json",
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="score N images spread over the folder (default: all)"
    )
    parser.add_argument(
        "--quality-data-path",
        type=Path,
        nargs="+",
        default=None,
        help="the training sites' folders (BUSI layout; BUS-BRA with bus_data.csv): fit the "
        "quality check on the network's encoder features of their images, validate it and "
        "compute it in both graphs (default: none; the service then uses image statistics)",
    )
    parser.add_argument(
        "--quality-folds-file",
        type=Path,
        default=None,
        help="site folds of those images (default: training/splits/sites-5fold.json)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="scoring batch (default: 8)")
    cli.add_flag(parser, "--threads", default=0)
    return parser


def export_main(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Verify, export, validate, publish; the summary. Raises ValidationRefused (nothing is
    published), the errors of verify_artifact / publish_artifact, ValueError for an artifact this
    command cannot rebuild and FileNotFoundError for missing data or fold weights."""
    import onnxruntime

    from training.data import (
        DEFAULT_FOLDS_FILE,
        data_fingerprint,
        load_folds,
        load_split_images,
        scan_dataset,
    )
    from training.engine import configure_threads
    from training.runner import display_path

    configure_threads(args.threads)
    info = verify_artifact(args.model_dir, args.task, args.version)
    eager, preset = eager_model(info)
    preprocessing = Preprocessing.from_metadata(info.metadata["preprocessing"])
    detector, quality = None, None
    if args.quality_data_path:
        detector, quality = fit_quality_check(
            eager, preprocessing, list(args.quality_data_path), args.quality_folds_file
        )
        quality["command"] = command
        log.info("quality check: AUROC %.4f on non-ultrasound images, flagged %s",
                 quality["auroc_mean_over_folds"],
                 {k: v["flagged"] for k, v in quality["flagged_by_site"].items()})  # fmt: skip
    example = torch.zeros((1, 3, preset.size, preset.size))
    graphs = {graph: ServedGraph(eager, graph, detector) for graph in GRAPHS}
    exported = {graph: export_onnx(module, example) for graph, module in graphs.items()}
    artifact_onnx = exported[GRAPH_FULL]
    for graph, data_bytes in exported.items():
        log.info("exported %s %s (%s graph) to ONNX (opset %d, %.1f MB)", info.task,
                 info.version, graph, onnx_opset(data_bytes), len(data_bytes) / 1e6)  # fmt: skip

    samples = scan_dataset(args.data_path)
    fingerprint = data_fingerprint(samples)
    same_data = fingerprint["sha256"] == (info.metadata.get("data_fingerprint") or {}).get("sha256")
    cv = None
    if args.cv_dir is not None:
        folds_file = args.folds_file or DEFAULT_FOLDS_FILE
        cv = (args.cv_dir, load_folds(folds_file, samples))
        _check_fold_recipe(args.cv_dir, preset)
    picked = [samples[i] for i in spread(len(samples), args.limit)]
    loaded = load_split_images(picked)
    data = Images(loaded.images, loaded.masks, [s.label for s in picked], [s.key for s in picked])
    measured = validate(info, preset, data, cv=cv, artifact_onnx=artifact_onnx,
                        batch_size=args.batch_size)  # fmt: skip
    subset = f"{len(picked)} of the {len(samples)} images" if args.limit else "every image"
    if cv is not None:
        source = (
            f"out-of-fold: {subset} of {args.data_path}, each scored by the fold model of "
            f"{args.cv_dir} that did not train on it (folds: {display_path(folds_file)}), as "
            "TorchScript fp32 exported as `training fit` exports and as the same fold model in "
            "ONNX Runtime"
        )
    else:
        trained = "the images it was trained on" if same_data else "images it may have seen"
        source = (
            f"not held out: {subset} of {args.data_path} ({trained}), scored by the artifact's "
            "own model.pt (TorchScript fp32) and model.onnx (ONNX Runtime)"
        )
    validation = {
        "source": source,
        "command": command,
        **measured,
        "data_fingerprint": fingerprint["sha256"],
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_opset": onnx_opset(artifact_onnx),
        "exported_with": {"torch": torch.__version__},
    }
    calibration = Calibration.from_manifest(info.metadata["output"]["classes"], len(CLASS_NAMES))
    classify = validate_classify(artifact_onnx, exported[GRAPH_CLASSIFY], preprocessing, data,
                                 calibration, args.batch_size)  # fmt: skip
    classify["source"] = (
        f"{subset} of {args.data_path}, scored by model.onnx (the full graph) and classify.onnx"
    )
    reasons = refusals(validation) + classify_refusals(classify)
    if reasons:
        raise ValidationRefused(reasons, {**validation, "classify": classify})

    output_dir = args.output_model_dir or args.model_dir
    version = args.new_version or new_version_name()
    outputs = {graph: module.output_names for graph, module in graphs.items()}
    inputs = probe_inputs(info.manifest.input.shape)
    metadata = derived_metadata(
        info, validation, classify, outputs, quality, probe_entry(len(inputs))
    )
    with tempfile.TemporaryDirectory(prefix="export-onnx-") as tmp:
        files = {}
        for graph, data_bytes in exported.items():
            name = runtime_file_name(RUNTIME_ONNX, graph)
            (Path(tmp) / name).write_bytes(data_bytes)
            files[name] = Path(tmp) / name
        probe_file = Path(tmp) / "probe.npz"
        write_probe(probe_file, inputs, model_pt_answers(info, inputs))
        publish_artifact(Path(output_dir), info.task, version, info.model_path, metadata,
                         runtime_files=files, probe_file=probe_file)  # fmt: skip
    published = verify_artifact(Path(output_dir), info.task, version)
    variant = published.manifest.runtime(RUNTIME_ONNX)
    assert variant is not None and variant.holds  # refusals() checked it
    log.info("published %s %s to %s (a candidate: promote it to serve)", info.task, version,
             published.path)  # fmt: skip
    return {
        "task": info.task,
        "version": version,
        "path": str(published.path),
        "derived_from": {"version": info.version, "sha256": info.sha256},
        "holds": variant.holds,
        "deltas": variant.deltas,
        "validation": validation,
        "classify": classify,
        "quality": quality,
        "promote": f"python -m training promote {info.task} {version} --model-dir {output_dir}",
    }


def probe_entry(count: int) -> dict[str, Any]:
    """The manifest's probe entry for `count` batches of probe_inputs (publish_artifact adds its
    file and sha256)."""
    return {
        "batches": count,
        "source": f"the artifact's model.pt (TorchScript fp32, torch {torch.__version__}) on "
        f"{count} batches of {PROBE_BATCH}: zeros, and normal(0, 1) noise of seed 0",
    }


def model_pt_answers(info: ArtifactInfo, inputs: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
    """The artifact's model.pt's float32 outputs for each input batch (what a probe records)."""
    module = inference.load_module(info)
    answers = []
    with torch.inference_mode():
        for batch in inputs:
            out = module(torch.from_numpy(np.ascontiguousarray(batch, np.float32)))
            out = out if isinstance(out, tuple | list) else (out,)
            answers.append([t.float().numpy() for t in out])
    return answers


def _check_fold_recipe(cv_dir: Path, preset: Any) -> None:
    """The fold models must be the artifact's recipe (what a fold<k>.json records of it)."""
    for path in sorted(Path(cv_dir).glob("fold*.json")):
        recipe = json.loads(path.read_text()).get("recipe") or {}
        differs = [
            key for key in ("encoder", "size", "flip_tta", "threshold")
            if key in recipe and recipe[key] != getattr(preset, key)
        ]  # fmt: skip
        if differs:
            raise ValueError(f"{path} is another recipe than the artifact's ({', '.join(differs)})")


def main(argv: list[str]) -> int:
    """Run export-onnx; the exit status (1 when refused or the source cannot be used)."""
    from training.cli import command_line
    from training.runner import json_ready

    args = get_args_parser().parse_args(argv)
    try:
        summary = export_main(args, command_line("export-onnx", argv))
    except ValidationRefused as exc:
        for reason in exc.reasons:
            log.error("not published: %s", reason)
        print(json.dumps(json_ready({"published": False, "reasons": exc.reasons,
                                     "validation": exc.validation}), indent=1))  # fmt: skip
        return 1
    except (ArtifactError, ValueError, FileNotFoundError) as exc:
        log.error("export-onnx failed: %s", getattr(exc, "message", None) or exc)
        return 1
    print(json.dumps(json_ready(summary), indent=1))
    return 0
