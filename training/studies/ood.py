"""The out-of-distribution check: its evaluation set, its per-fold evaluation and its fit.

    python -m training ood --data-path D [--folds-file F] [--output-dir R] [--detector-out J]

In-distribution: the BUSI images. Out-of-distribution, all without a download: the photographs and
drawings bundled with scikit-image, the image-bearing test files bundled with pydicom whose
Modality is not US (CT, MR, RT dose, secondary-capture colour test images, ...), and synthetic
noise, blank, gradient and pattern images. Every image goes through `shared.decoding`, as an
upload would.

Evaluation is honest about the BUSI side: for each of the grouped folds the detector is fitted on
the other folds' BUSI images and scores the held-out fold, so every BUSI score (and the false-flag
rate) comes from a detector that never saw that image or its near-duplicates. The OOD images are
never used to fit anything: each fold detector scores all of them, AUROC (held-out BUSI against
OOD) is computed per fold and averaged.
The detector the service ships is then fitted on all BUSI images with the same recipe. As a check
that the flag is about content and not BUSI's square export format, the held-out BUSI images are
also scored as 4:3 exports (stretched, with black margins).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.decoding import decode_image
from shared.errors import InputError
from shared.quality import (
    DEFAULT_DETECTOR_FILE,
    FEATURE_NAMES,
    FeatureOodDetector,
    OodDetector,
    image_statistics,
)
from training import cli
from training.data import DEFAULT_FOLDS_FILE, scan_dataset

log = logging.getLogger(__name__)

QUANTILE = 0.995  # of the training scans' own distances: the flag threshold
SHRINKAGE = 0.1


@dataclass(frozen=True)
class Scored:
    name: str
    source: str  # "busi", "skimage", "pydicom", "synthetic"
    pixels: np.ndarray


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_images(seed: int = 0) -> list[Scored]:
    """Noise, blank, gradient and pattern images of a few sizes, as decoded frames."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    for h, w in ((256, 256), (480, 640), (600, 500)):
        yy, xx = np.mgrid[0:h, 0:w]
        out += [
            (f"uniform-noise-{w}x{h}", rng.integers(0, 256, (h, w))),
            (f"gaussian-noise-{w}x{h}", np.clip(rng.normal(110, 40, (h, w)), 0, 255)),
            (f"black-{w}x{h}", np.zeros((h, w))),
            (f"white-{w}x{h}", np.full((h, w), 255)),
            (f"grey-{w}x{h}", np.full((h, w), 128)),
            (f"gradient-horizontal-{w}x{h}", 255 * xx / (w - 1)),
            (f"gradient-vertical-{w}x{h}", 255 * (1 - yy / (h - 1))),
            (f"gradient-radial-{w}x{h}", 255 * np.hypot(yy - h / 2, xx - w / 2) / np.hypot(h, w)),
            (f"checkerboard-{w}x{h}", 255 * (((yy // 32) + (xx // 32)) % 2)),
            (f"stripes-{w}x{h}", 127.5 + 127.5 * np.sin(xx / 6.0)),
        ]
    return [
        Scored(name, "synthetic", np.ascontiguousarray(np.rint(a).clip(0, 255).astype(np.uint8)))
        for name, a in out
    ]


def skimage_images() -> list[Scored]:
    """scikit-image's bundled sample images (photographs, micrographs, drawings, text)."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".gif", ".tif"):
            continue
        data = path.read_bytes()
        try:
            if path.suffix.lower() in (".gif", ".tif"):  # not upload formats: re-encode as PNG
                with Image.open(io.BytesIO(data)) as im:
                    data = _png_bytes(np.asarray(im.convert("RGB")))
            out.append(Scored(path.name, "skimage", decode_image(data).pixels))
        except (InputError, OSError):
            log.info("skimage sample %s does not decode; left out", path.name)
    return out


def pydicom_images() -> list[Scored]:
    """pydicom's bundled test files that hold an image and are not ultrasound."""
    import pydicom.data
    from pydicom import dcmread

    folder = Path(pydicom.data.__file__).parent / "test_files"
    out = []
    for path in sorted(folder.glob("*.dcm")):
        data = path.read_bytes()
        try:
            modality = str(dcmread(io.BytesIO(data), stop_before_pixels=True).get("Modality", ""))
        except Exception:  # broken test files on purpose
            continue
        if modality.upper() == "US":
            continue
        try:
            out.append(Scored(path.name, "pydicom", decode_image(data).pixels))
        except InputError:
            continue  # no pixels, unsupported, corrupt: the service refuses these anyway
        except (TypeError, ValueError):  # a decoder bug on a malformed header; not ours to score
            log.warning("pydicom test file %s crashes the decoder; left out", path.name)
    return out


def as_wide_export(pixels: np.ndarray) -> np.ndarray:
    """A BUSI frame as a 4:3 scanner export would show it: stretched to 4:3, black margins."""
    h, w = pixels.shape
    wide = np.asarray(Image.fromarray(pixels).resize((round(h * 4 / 3), h), Image.BILINEAR))
    canvas = np.zeros((h + h // 10, wide.shape[1] + wide.shape[1] // 5), dtype=np.uint8)
    top, left = h // 10, wide.shape[1] // 10
    canvas[top : top + h, left : left + wide.shape[1]] = wide
    return canvas


def ood_images() -> list[Scored]:
    return skimage_images() + pydicom_images() + synthetic_images()


def statistics(images: list[Scored]) -> np.ndarray:
    return np.stack([image_statistics(s.pixels) for s in images])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an OOD image scores above an in-distribution one), ties counting half."""
    a = np.asarray(in_scores)[:, None]
    b = np.asarray(out_scores)[None, :]
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / (a.size * b.size))


def evaluate(
    busi: np.ndarray,
    folds: np.ndarray,
    ood: np.ndarray,
    ood_sources: list[str],
    busi_wide: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-fold fit on the other folds' BUSI statistics; score the held-out BUSI (and, when
    given, the same images as 4:3 exports) and all OOD images."""
    held_out = np.zeros(len(busi))
    held_out_wide = np.zeros(len(busi))
    per_fold = []
    ood_flagged = np.zeros(len(ood))
    for fold in sorted(set(folds.tolist())):
        train, test = folds != fold, folds == fold
        detector = OodDetector.fit(busi[train], QUANTILE, SHRINKAGE)
        held_out[test] = detector.scores(busi[test])
        if busi_wide is not None:
            held_out_wide[test] = detector.scores(busi_wide[test])
        out_scores = detector.scores(ood)
        ood_flagged += out_scores > 1.0
        per_fold.append(
            {
                "fold": int(fold),
                "n_busi_held_out": int(test.sum()),
                "busi_flagged": float((held_out[test] > 1.0).mean()),
                "auroc": auroc(held_out[test], out_scores),
                "ood_detected": float((out_scores > 1.0).mean()),
            }
        )
    n_folds = len(per_fold)
    by_source = {
        source: {
            "n": int(sum(s == source for s in ood_sources)),
            "detected": float(
                np.mean(
                    [
                        f / n_folds
                        for f, s in zip(ood_flagged, ood_sources, strict=True)
                        if s == source
                    ]
                )
            ),
        }
        for source in sorted(set(ood_sources))
    }
    return {
        "n_busi": int(len(busi)),
        "n_ood": int(len(ood)),
        "busi_flagged": float((held_out > 1.0).mean()),
        "busi_flagged_count": int((held_out > 1.0).sum()),
        "busi_as_4to3_export_flagged": (
            float((held_out_wide > 1.0).mean()) if busi_wide is not None else None
        ),
        "auroc_mean_over_folds": float(np.mean([f["auroc"] for f in per_fold])),
        "auroc_min_over_folds": float(np.min([f["auroc"] for f in per_fold])),
        "ood_detected": float(ood_flagged.sum() / (n_folds * len(ood))),
        "ood_by_source": by_source,
        "per_fold": per_fold,
        "held_out_busi_scores": held_out.tolist(),
    }


# --- the check on the served model's own features ---------------------------------------------

FEATURE_QUANTILE = 0.99  # of each site's out-of-fold distances: the flag threshold
FEATURE_AUROC_FLOOR = 0.98  # non-ultrasound against held-out training-site images, mean over folds
FEATURE_FLAGGED_CEILING = 0.02  # of each training site's held-out images


def evaluate_feature_check(
    features: np.ndarray,
    sites: list[str],
    folds: np.ndarray,
    ood: np.ndarray,
    ood_sources: list[str],
    quantile: float = FEATURE_QUANTILE,
    shrinkage: float = SHRINKAGE,
) -> dict[str, Any]:
    """shared.quality.FeatureOodDetector on the training sites' pooled encoder features,
    evaluated as the image-statistics check is: for each fold, fitted on the other folds' images
    (every site) and scoring the held-out fold's images and every non-ultrasound image. Returns
    the figures, with `holds` (AUROC and each site's flagged share within the floors) and
    `refusals` (why not). Each fold's detector sets its threshold on the other folds' images
    alone (FeatureOodDetector.fit with their folds), so the held-out fold is never seen."""
    features = np.asarray(features, dtype=np.float64)
    site_of = np.asarray(sites)
    held_out = np.zeros(len(features))
    ood_flagged = np.zeros(len(ood))
    per_fold = []
    for fold in sorted(set(folds.tolist())):
        train, test = folds != fold, folds == fold
        detector = FeatureOodDetector.fit(
            features[train], folds[train], site_of[train], quantile, shrinkage
        )
        held_out[test] = detector.scores(features[test])
        out_scores = detector.scores(ood)
        ood_flagged += out_scores > 1.0
        per_fold.append({
            "fold": int(fold),
            "n_held_out": int(test.sum()),
            "flagged": float((held_out[test] > 1.0).mean()),
            "auroc": auroc(held_out[test], out_scores),
            "ood_detected": float((out_scores > 1.0).mean()),
        })  # fmt: skip
    n_folds = len(per_fold)
    by_site = {
        site: {
            "n": int((site_of == site).sum()),
            "flagged": float((held_out[site_of == site] > 1.0).mean()),
            "flagged_count": int((held_out[site_of == site] > 1.0).sum()),
        }
        for site in sorted(set(sites))
    }
    by_source = {
        source: {
            "n": int(sum(s == source for s in ood_sources)),
            "detected": float(np.mean([
                f / n_folds for f, s in zip(ood_flagged, ood_sources, strict=True) if s == source
            ])),
        }
        for source in sorted(set(ood_sources))
    }  # fmt: skip
    result: dict[str, Any] = {
        "method": "Mahalanobis distance of the pooled deepest encoder features (averaged over "
        "the mirror image as the served network averages) to the training sites' features; "
        f"standardised, covariance shrunk by {shrinkage}, threshold the highest over sites of "
        f"the {quantile} quantile of their out-of-fold distances",
        "n_images": int(len(features)),
        "n_ood": int(len(ood)),
        "feature_dimension": int(features.shape[1]),
        "auroc_mean_over_folds": float(np.mean([f["auroc"] for f in per_fold])),
        "auroc_min_over_folds": float(np.min([f["auroc"] for f in per_fold])),
        "flagged_by_site": by_site,
        "ood_detected": float(ood_flagged.sum() / (n_folds * len(ood))),
        "ood_by_source": by_source,
        "per_fold": per_fold,
        "floors": {"auroc": FEATURE_AUROC_FLOOR, "flagged_per_site": FEATURE_FLAGGED_CEILING},
    }
    refusals = []
    if not result["auroc_mean_over_folds"] >= FEATURE_AUROC_FLOOR:
        refusals.append(
            f"AUROC on non-ultrasound images {result['auroc_mean_over_folds']:.4f} is under "
            f"{FEATURE_AUROC_FLOOR}"
        )
    for site, figures in by_site.items():
        if not figures["flagged"] <= FEATURE_FLAGGED_CEILING:
            refusals.append(
                f"{100 * figures['flagged']:.2f}% of {site}'s held-out images are flagged "
                f"(ceiling {100 * FEATURE_FLAGGED_CEILING:g}%)"
            )
    result["holds"] = not refusals
    result["refusals"] = refusals
    result["held_out_scores"] = held_out.tolist()
    result["ood_flagged_share"] = (ood_flagged / n_folds).tolist()  # per image, over the folds
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    samples = scan_dataset(args.data_path)
    items = json.loads(Path(args.folds_file).read_text())["items"]
    folds = np.asarray([items[s.key]["fold"] for s in samples])
    log.info("image statistics of %d BUSI images", len(samples))
    pixels = [decode_image(s.image_path.read_bytes()).pixels for s in samples]
    busi = np.stack([image_statistics(p) for p in pixels])
    busi_wide = np.stack([image_statistics(as_wide_export(p)) for p in pixels])
    del pixels
    ood_set = ood_images()
    ood = statistics(ood_set)
    log.info("%d out-of-distribution images", len(ood_set))
    result = evaluate(busi, folds, ood, [s.source for s in ood_set], busi_wide)
    detector = OodDetector.fit(busi, QUANTILE, SHRINKAGE, version=args.version)
    flagged_busi = [
        s.key for s, v in zip(samples, result["held_out_busi_scores"], strict=True) if v > 1.0
    ]
    missed = [s.name for s, v in zip(ood_set, detector.scores(ood), strict=True) if v <= 1.0]
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python -m training ood " + " ".join(args.argv),
        "detector": {
            "version": args.version,
            "features": list(FEATURE_NAMES),
            "quantile": QUANTILE,
            "shrinkage": SHRINKAGE,
            "threshold": detector.threshold,
        },
        **{k: v for k, v in result.items() if k != "held_out_busi_scores"},
        "busi_flagged_keys": flagged_busi,
        "ood_missed_by_shipped_detector": missed,
        "ood_images": [f"{s.source}:{s.name}" for s in ood_set],
    }
    (output / "ood.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.detector_out:
        detector.save(Path(args.detector_out))
        log.info("detector written to %s", args.detector_out)
    log.info(
        "OOD: AUROC %.4f (min over folds %.4f), held-out BUSI flagged %.2f%% (%d of %d; as 4:3 "
        "exports %.2f%%), OOD detected %.1f%%",
        result["auroc_mean_over_folds"],
        result["auroc_min_over_folds"],
        100 * result["busi_flagged"],
        result["busi_flagged_count"],
        result["n_busi"],
        100 * result["busi_as_4to3_export_flagged"],
        100 * result["ood_detected"],
    )
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "ood", "Evaluate (grouped folds) and fit the image-statistics OOD detector."
    )
    cli.add_flag(parser, "--data-path", required=True)
    cli.add_flag(parser, "--folds-file", default=DEFAULT_FOLDS_FILE)
    cli.add_flag(parser, "--output-dir", default=Path("training/reports/quality"))
    parser.add_argument(
        "--detector-out",
        type=Path,
        default=None,
        help=f"write the detector fitted on all images here (default: none; the service reads "
        f"{DEFAULT_DETECTOR_FILE.name} in shared/)",
    )
    parser.add_argument(
        "--version", default="1", help="version stored in the detector (default: 1)"
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    return args
