"""Shortcut check: do the predictions lean on calipers and burned-in text?

    python -m training shortcuts --cv-dir training/reports/cv/joint-lite0 \
        --data-path ../shared/data/busi [--preset joint-lite0] [--output-dir R]

Without `--cv-dir` only the marks are detected: how common they are per class, and `marks.png`,
a sample of images with what was detected drawn in red.

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
from training import cli
from training.data import DEFAULT_FOLDS_FILE

log = logging.getLogger(__name__)

TOPHAT_SIZE = 5  # marks are at most ~3 px wide; tissue ridges are wider and survive the opening
TOPHAT_MIN = 100  # grey levels above the opening: sharp, high-contrast
BRIGHT_MIN = 160  # marks are light grey to white
MIN_AREA = 4
MAX_FILL = 0.6  # a kept component covers at most this share of its bounding box (thin)
DOT_AREA = 9  # compact components up to this size are kept as dots of a dotted caliper line ...
DOT_TOPHAT = 150  # ... when this much brighter than their surroundings (speckle peaks are not)
INPAINT_SIGMA = 3.0
NEAR_LESION_PX = 12  # marks within this distance of the true lesion count as on it (calipers)


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
        if area < MIN_AREA:
            continue
        elongated = max(component.shape) >= 3 * min(component.shape)
        thin = area / component.size <= MAX_FILL or elongated
        dot = area <= DOT_AREA and int(tophat[box][component].max()) >= DOT_TOPHAT
        keep[index] = thin or dot
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


def split_near_lesion(marks: np.ndarray, lesion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(marks near the true lesion, marks away from it): a mark component belongs to the first
    when any of its pixels lies within NEAR_LESION_PX of the lesion mask (calipers measure the
    lesion, so they sit on its edge; text and rulers sit in the margins)."""
    if not lesion.any():
        return np.zeros_like(marks), marks
    near_zone = ndimage.distance_transform_edt(~lesion) <= NEAR_LESION_PX
    labels, n = ndimage.label(marks, structure=np.ones((3, 3), bool))
    touching = np.unique(labels[near_zone & marks])
    near = np.isin(labels, touching[touching > 0])
    return near, marks & ~near


def _figures(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from training.metrics import _scalars

    if len(labels) == 0:
        return {}
    out = _scalars(labels, probs, CLASS_NAMES)
    return {"accuracy": out["accuracy"], "macro_auc": out.get("macro_auc", float("nan"))}


def accuracy_change_interval(
    labels: np.ndarray,
    original: np.ndarray,
    changed: np.ndarray,
    groups: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[float]:
    """95% percentile interval of (accuracy changed - accuracy original), resampling
    near-duplicate groups with replacement (paired: both arms on the same draw)."""
    delta = (changed.argmax(1) == labels).astype(float) - (original.argmax(1) == labels)
    unique, index = np.unique(groups, return_inverse=True)
    sums = np.bincount(index, weights=delta, minlength=len(unique))
    counts = np.bincount(index, minlength=len(unique)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(unique), size=(n_resamples, len(unique)))
    values = sums[draws].sum(1) / counts[draws].sum(1)
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def flip_matrix(original: np.ndarray, changed: np.ndarray) -> list[list[int]]:
    """Counts [from original label][to changed label] over the images whose label flipped."""
    out = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), int)
    a, b = original.argmax(1), changed.argmax(1)
    for i, j in zip(a[a != b], b[a != b], strict=True):
        out[i, j] += 1
    return out.tolist()


def compare(
    labels: np.ndarray,
    has_marks: np.ndarray,
    variants: dict[str, np.ndarray],
    groups: np.ndarray | None = None,
) -> dict[str, Any]:
    """Figures of each variant's probabilities against "original", on all and on marked images;
    with `groups`, a grouped-bootstrap interval of each variant's accuracy change."""
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
                fig["flips_from_to"] = flip_matrix(original[rows], probs[rows])
                if groups is not None:
                    fig["accuracy_change_ci95"] = accuracy_change_interval(
                        labels[rows], original[rows], probs[rows], groups[rows]
                    )
            block[name] = fig
        out[subset] = block
    return out


def mark_prevalence(labels: np.ndarray, has_marks: np.ndarray) -> dict[str, float]:
    return {
        name: float(has_marks[labels == k].mean()) if (labels == k).any() else float("nan")
        for k, name in enumerate(CLASS_NAMES)
    }


def overlay_grid(images: list[np.ndarray], masks: list[np.ndarray], path: Path) -> Path:
    """Up to 16 frames with their detected marks in red, 4 to a row (for a human to judge)."""
    from PIL import Image

    tiles = []
    for image, mask in list(zip(images, masks, strict=True))[:16]:
        rgb = np.repeat(image[..., None], 3, axis=2)
        rgb[mask] = (255, 0, 0)
        tiles.append(np.asarray(Image.fromarray(rgb).resize((192, 192), Image.NEAREST)))
    while len(tiles) % 4:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[i : i + 4], axis=1) for i in range(0, len(tiles), 4)]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path


def fold_predictions(
    args: argparse.Namespace,
    samples: list,
    items: dict[str, dict[str, int]],
    images: list[np.ndarray],
    masks: list[np.ndarray],
    lesions: list[np.ndarray],
) -> dict[str, np.ndarray]:
    """Each fold model's probabilities on its held-out images: as they are, with the marks
    inpainted, with the same mark shapes inpainted elsewhere (the control), and with only the
    marks on the lesion (calipers) or only those away from it (text, rulers) inpainted."""
    import torch

    from training import engine
    from training.joint import build_model, get_preset, predict, preprocessing_for

    preset = get_preset(args.preset)
    engine.configure_threads(args.threads)
    preprocessing = preprocessing_for(preset)
    rng = np.random.default_rng(0)
    n = len(samples)
    names = ("original", "inpainted", "control", "inpainted_near_lesion", "inpainted_away")
    variants = {name: np.zeros((n, len(CLASS_NAMES))) for name in names}
    covered = np.zeros(n, bool)
    for weights in sorted(Path(args.cv_dir).glob("fold*.pt")):
        fold = int(weights.stem.removeprefix("fold"))
        model = build_model(preset, pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        idx = [i for i, s in enumerate(samples) if items[s.key]["fold"] == fold]
        inputs = {
            "original": [images[i] for i in idx],
            "inpainted": [inpaint(images[i], masks[i]) for i in idx],
            "control": [inpaint(images[i], shifted_mask(masks[i], rng)) for i in idx],
        }
        parts = [split_near_lesion(masks[i], lesions[i]) for i in idx]
        inputs["inpainted_near_lesion"] = [
            inpaint(images[i], near) for i, (near, _) in zip(idx, parts, strict=True)
        ]
        inputs["inpainted_away"] = [
            inpaint(images[i], away) for i, (_, away) in zip(idx, parts, strict=True)
        ]
        for name, frames in inputs.items():
            variants[name][idx] = predict(model, preprocessing, frames, preset.flip_tta).probs
        covered[idx] = True
        log.info("fold %d: %d held-out images compared", fold, len(idx))
    if not covered.all() and not args.partial:
        raise ValueError(f"fold weights in {args.cv_dir} cover {int(covered.sum())} of {n} images")
    return {name: probs[covered] for name, probs in variants.items()} | {"covered": covered}


def main(args: argparse.Namespace) -> dict[str, Any]:
    from training.data import load_folds, load_image, load_mask, scan_dataset

    samples = scan_dataset(args.data_path)
    labels = np.asarray([s.label for s in samples])
    images = [load_image(s) for s in samples]
    masks = [detect_marks(im) for im in images]
    has_marks = np.asarray([m.any() for m in masks])
    fraction = np.asarray([m.mean() for m in masks])
    output = Path(args.output_dir)
    if args.write_cleaned is not None:
        write_cleaned(samples, images, masks, args.data_path, args.write_cleaned)
    marked = [i for i in range(len(samples)) if has_marks[i]][:: max(1, int(has_marks.sum()) // 16)]
    if marked:
        overlay_grid([images[i] for i in marked], [masks[i] for i in marked], output / "marks.png")
    report: dict[str, Any] = {
        "command": "python -m training shortcuts " + " ".join(args.argv),
        "detector": {
            "tophat_size": TOPHAT_SIZE,
            "tophat_min": TOPHAT_MIN,
            "bright_min": BRIGHT_MIN,
            "min_area": MIN_AREA,
            "max_fill": MAX_FILL,
            "dot_area": DOT_AREA,
            "dot_tophat": DOT_TOPHAT,
            "inpaint_sigma": INPAINT_SIGMA,
        },
        "n_images": len(samples),
        "images_with_marks": float(has_marks.mean()),
        "mark_prevalence_by_class": mark_prevalence(labels, has_marks),
        "mean_marked_pixel_fraction": float(fraction[has_marks].mean()) if has_marks.any() else 0.0,
    }
    if args.cv_dir is not None:
        items = load_folds(Path(args.folds_file), samples)
        lesions = [load_mask(s, im.shape) > 127 for s, im in zip(samples, images, strict=True)]
        near = np.asarray(
            [split_near_lesion(m, les)[0].any() for m, les in zip(masks, lesions, strict=True)]
        )
        report["images_with_marks_near_lesion"] = float(near.mean())
        report["near_lesion_px"] = NEAR_LESION_PX
        variants = fold_predictions(args, samples, items, images, masks, lesions)
        covered = variants.pop("covered")
        groups = np.asarray([items[s.key]["group"] for s in samples])
        report["folds"] = sorted(
            int(p.stem.removeprefix("fold")) for p in args.cv_dir.glob("fold*.pt")
        )
        report.update(compare(labels[covered], has_marks[covered], variants, groups[covered]))
    output.mkdir(parents=True, exist_ok=True)
    (output / "shortcuts.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info(
        "marks on %.1f%% of images (%s)%s",
        100 * report["images_with_marks"],
        ", ".join(f"{k} {100 * v:.1f}%" for k, v in report["mark_prevalence_by_class"].items()),
        "; " + json.dumps({k: report[k] for k in ("all", "with_marks")}) if "all" in report else "",
    )
    return report


def write_cleaned(
    samples: list, images: list[np.ndarray], marks: list[np.ndarray], source: Path, target: Path
) -> None:
    """A copy of the data folder (BUSI layout) with every image's detected marks inpainted and
    the lesion masks copied as they are: the data for training a model that never sees marks."""
    import shutil

    from PIL import Image

    for sample, image, mark in zip(samples, images, marks, strict=True):
        path = Path(target) / sample.key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(inpaint(image, mark)).save(path)
        for mask in sorted(Path(source, sample.key).parent.glob(Path(sample.key).stem + "_mask*")):
            shutil.copyfile(mask, path.parent / mask.name)
    log.info("wrote %d images with their marks inpainted to %s", len(samples), target)


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "shortcuts", "Compare fold-model predictions with and without calipers / text marks."
    )
    parser.add_argument(
        "--cv-dir",
        type=Path,
        default=None,
        help="CV folder with the fold models fold<k>.pt (default: none: only detect the marks "
        "and report how common they are)",
    )
    cli.add_flag(parser, "--data-path", required=True)
    parser.add_argument(
        "--preset", default="joint-lite0", help="joint preset (default: joint-lite0)"
    )
    cli.add_flag(parser, "--folds-file", default=DEFAULT_FOLDS_FILE)
    cli.add_flag(parser, "--output-dir", default=Path("training/reports/shortcuts"))
    cli.add_flag(parser, "--threads", default=None)
    parser.add_argument(
        "--partial",
        action="store_true",
        help="score only the images whose fold model is present (default: all five needed)",
    )
    parser.add_argument(
        "--write-cleaned",
        type=Path,
        default=None,
        help="also write a copy of the data folder with the marks inpainted here",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    return args
