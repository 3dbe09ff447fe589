"""Shortcut check: do the predictions lean on calipers and burned-in text?

    python -m training shortcuts --cv-dir training/reports/cv/joint-lite0 \
        --data-path ../shared/data/busi [--preset joint-lite0] [--output-dir R]

Sonographers' calipers (small crosses, dotted lines) and burned-in text are bright, thin,
high-contrast marks. `detect_marks` finds them with a white top-hat (the image minus its grey
opening, which keeps only bright structures narrower than the opening) and keeps the bright
connected components that are thin (a small share of their bounding box). `inpaint` fills the
marked pixels from their surroundings (normalised Gaussian convolution of the unmarked pixels).

The comparison runs each fold model (`fold<k>.pt` in the CV folder) on its held-out images as
they are, with the marks inpainted, and, as a control for what inpainting alone does, with the
same mark shapes inpainted at another place of the image. It reports accuracy and macro AUC of
each, the share of images whose label flips and the mean change of the probabilities, on all
images and on those with marks, and how often marks occur per class (a mark that is more common
in one class is what a model could learn as a shortcut).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from shared.labels import CLASS_NAMES

log = logging.getLogger(__name__)

TOPHAT_SIZE = 9  # marks are narrower than this (pixels), lesions and tissue are wider
TOPHAT_MIN = 50  # grey levels above the opening
BRIGHT_MIN = 170  # marks are near-white
MIN_AREA = 4
MAX_FILL = 0.6  # a kept component covers at most this share of its bounding box (thin)
INPAINT_SIGMA = 3.0


def detect_marks(pixels: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W) bool: pixels of bright, thin marks (calipers, text), dilated 1 px."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise ValueError("expected a (H, W) uint8 grayscale image")
    x = pixels.astype(np.int16)
    tophat = x - ndimage.grey_opening(x, size=(TOPHAT_SIZE, TOPHAT_SIZE))
    candidate = (tophat >= TOPHAT_MIN) & (x >= BRIGHT_MIN)
    labels, n = ndimage.label(candidate, structure=np.ones((3, 3), bool))
    keep = np.zeros(n + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        component = labels[box] == index
        area = int(component.sum())
        fill = area / component.size
        if area >= MIN_AREA and (
            fill <= MAX_FILL or max(component.shape) >= 3 * min(component.shape)
        ):
            keep[index] = True
    marks = keep[labels]
    return ndimage.binary_dilation(marks, iterations=1)


def inpaint(pixels: np.ndarray, mask: np.ndarray, sigma: float = INPAINT_SIGMA) -> np.ndarray:
    """Fill the `mask` pixels of a uint8 image from the unmasked ones nearby (normalised
    Gaussian convolution, widened until every masked pixel has support)."""
    if not mask.any():
        return pixels.copy()
    x = pixels.astype(np.float64)
    known = (~mask).astype(np.float64)
    out = x.copy()
    todo = mask.copy()
    s = sigma
    while todo.any() and s < max(pixels.shape):
        num = ndimage.gaussian_filter(x * known, s)
        den = ndimage.gaussian_filter(known, s)
        ready = todo & (den > 1e-3)
        out[ready] = num[ready] / den[ready]
        todo &= ~ready
        s *= 2
    out[todo] = x[~mask].mean() if (~mask).any() else 0.0
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def shifted_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same mark shapes at another place (a random circular shift): the inpainting control."""
    h, w = mask.shape
    return np.roll(
        mask,
        (int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))),
        axis=(0, 1),
    )


def _figures(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from training.metrics import _scalars

    if len(labels) == 0:
        return {}
    out = _scalars(labels, probs, CLASS_NAMES)
    return {"accuracy": out["accuracy"], "macro_auc": out.get("macro_auc", float("nan"))}


def compare(
    labels: np.ndarray, has_marks: np.ndarray, variants: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Figures of each variant's probabilities against "original", on all and on marked images."""
    original = variants["original"]
    out: dict[str, Any] = {}
    for subset, rows in (("all", np.ones(len(labels), bool)), ("with_marks", has_marks)):
        block: dict[str, Any] = {"n": int(rows.sum())}
        for name, probs in variants.items():
            fig = _figures(probs[rows], labels[rows])
            if name != "original" and rows.any():
                fig["label_flips"] = float(
                    (probs[rows].argmax(1) != original[rows].argmax(1)).mean()
                )
                fig["mean_abs_probability_change"] = float(
                    np.abs(probs[rows] - original[rows]).sum(1).mean() / 2
                )
            block[name] = fig
        out[subset] = block
    return out


def mark_prevalence(labels: np.ndarray, has_marks: np.ndarray) -> dict[str, float]:
    return {
        name: float(has_marks[labels == k].mean()) if (labels == k).any() else float("nan")
        for k, name in enumerate(CLASS_NAMES)
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from training import engine
    from training.data import load_image, scan_dataset
    from training.joint import build_model, get_preset, load_folds, predict, preprocessing_for

    preset = get_preset(args.preset)
    samples = scan_dataset(args.data_path)
    items = load_folds(Path(args.folds_file), samples)
    engine.configure_threads(args.threads)
    preprocessing = preprocessing_for(preset)
    rng = np.random.default_rng(0)
    n = len(samples)
    labels = np.asarray([s.label for s in samples])
    has_marks = np.zeros(n, bool)
    mark_fraction = np.zeros(n)
    variants = {
        name: np.zeros((n, len(CLASS_NAMES))) for name in ("original", "inpainted", "control")
    }
    covered = np.zeros(n, bool)
    for weights in sorted(Path(args.cv_dir).glob("fold*.pt")):
        fold = int(weights.stem.removeprefix("fold"))
        model = build_model(preset, pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] == fold]
        images = [load_image(samples[i]) for i in idx]
        masks = [detect_marks(im) for im in images]
        for i, m in zip(idx, masks, strict=True):
            has_marks[i], mark_fraction[i] = m.any(), m.mean()
        inputs = {
            "original": images,
            "inpainted": [inpaint(im, m) for im, m in zip(images, masks, strict=True)],
            "control": [
                inpaint(im, shifted_mask(m, rng)) for im, m in zip(images, masks, strict=True)
            ],
        }
        for name, frames in inputs.items():
            variants[name][idx] = predict(model, preprocessing, frames, preset.flip_tta).probs
        covered[idx] = True
        log.info("fold %d: %d images, %d with marks", fold, len(idx), int(has_marks[idx].sum()))
    if not covered.all():
        raise ValueError(f"fold weights cover {int(covered.sum())} of {n} images")
    report = {
        "command": "python -m training shortcuts " + " ".join(args.argv),
        "detector": {
            "tophat_size": TOPHAT_SIZE,
            "tophat_min": TOPHAT_MIN,
            "bright_min": BRIGHT_MIN,
            "min_area": MIN_AREA,
            "max_fill": MAX_FILL,
            "inpaint_sigma": INPAINT_SIGMA,
        },  # fmt: skip
        "images_with_marks": float(has_marks.mean()),
        "mark_prevalence_by_class": mark_prevalence(labels, has_marks),
        "mean_marked_pixel_fraction": float(mark_fraction[has_marks].mean())
        if has_marks.any()
        else 0.0,
        **compare(labels, has_marks, variants),
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "shortcuts.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("shortcut check: %s", json.dumps({k: report[k] for k in ("all", "with_marks")}))
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training shortcuts",
        description="Compare fold-model predictions with and without calipers / text marks.",
    )
    parser.add_argument("--cv-dir", type=Path, required=True, help="CV folder with fold<k>.pt")
    parser.add_argument("--data-path", type=Path, required=True, help="BUSI folder; required")
    parser.add_argument(
        "--preset", default="joint-lite0", help="joint preset (default: joint-lite0)"
    )
    parser.add_argument(
        "--folds-file",
        type=Path,
        default=Path(__file__).parent / "splits" / "busi-5fold.json",
        help="grouped fold file (default: training/splits/busi-5fold.json)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("training/reports/shortcuts"),
        help="report folder (default: training/reports/shortcuts)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    return args
