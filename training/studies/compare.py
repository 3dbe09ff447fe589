"""Score a separate classifier + segmenter pair and the joint model's out-of-fold predictions on
the same images: the comparison behind the README's model table.

    python -m training compare --data-path D --classifier models/classification/V \
        --segmenter models/segmentation/V --oof training/reports/cv/joint-lite0/oof.json \
        --split-file training/splits/busi.json --split test --output-dir R

The pair is run as the service runs it (each artifact's own preprocessing from its manifest, the
mask brought back onto the frame, the manifest's threshold) on the `--split` images of the split
file, plain and on the 4:3 and 16:9 canvases of `training.joint.on_canvas`; the joint model's
figures are its out-of-fold rows for the very same images (each scored by the fold model that did
not train on it). Intervals: 95% percentile bootstrap over near-duplicate groups.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shared.inference import (
    RUNTIME_TORCHSCRIPT,
    InferenceModel,
    load_artifact,
    model_input,
    predict,
    probabilities,
    split_outputs,
)
from shared.labels import CLASS_NAMES
from shared.postprocessing import dice_iou
from shared.store import ArtifactInfo, verify_artifact
from training import cli
from training.data import load_image, load_mask, scan_dataset
from training.joint import CANVASES, METRIC_ROWS, place_on_canvas, summarise
from training.metrics import diagnosis_figures, group_bootstrap

log = logging.getLogger(__name__)


def _artifact(path: Path) -> ArtifactInfo:
    path = Path(path)
    return verify_artifact(path.parents[1], path.parent.name, path.name)


def score_pair(
    classifier_dir: Path, segmenter_dir: Path, images: list, masks: list, samples: list
) -> list[dict[str, Any]]:
    cls_info, seg_info = _artifact(classifier_dir), _artifact(segmenter_dir)
    classifier, segmenter = _load(cls_info), _load(seg_info)
    rows = []
    for sample, image, truth in zip(samples, images, masks, strict=True):
        probs = dict(zip(CLASS_NAMES, _class_probs(cls_info, classifier, image, None), strict=True))
        pred = _predict_mask(segmenter, image)
        rows.append(
            {
                "key": sample.key,
                "label": sample.label,
                "probs": [probs[name] for name in ("normal", "benign", "malignant")],
                "dice": dice_iou(pred, truth > 127)[0],
                "mask_pixels": int(pred.sum()),
            }
        )
    return rows


def main(args: argparse.Namespace) -> dict[str, Any]:
    split = json.loads(Path(args.split_file).read_text())["items"]
    samples = [s for s in scan_dataset(args.data_path) if split[s.key]["split"] == args.split]
    groups = {s.key: int(split[s.key]["group"]) for s in samples}
    images = [load_image(s) for s in samples]
    masks = [load_mask(s, im.shape) for s, im in zip(samples, images, strict=True)]
    pair: dict[str, list] = {}
    for name, aspect in CANVASES.items():
        placed_images, placed_masks = images, masks
        if aspect is not None:
            placed_images, placed_masks = place_on_canvas(images, masks, aspect)
        rows = score_pair(args.classifier, args.segmenter, placed_images, placed_masks, samples)
        pair[name] = [{**row, "group": groups[row["key"]]} for row in rows]
    oof = json.loads(Path(args.oof).read_text())
    keys = set(groups)
    joint = {name: [r for r in rows if r["key"] in keys] for name, rows in oof.items()}
    if any(len(rows) != len(keys) for rows in joint.values()):
        raise ValueError("the out-of-fold rows do not cover every image of the split")
    report = {
        "split": args.split,
        "n": len(samples),
        "pair": {"classifier": str(args.classifier), "segmenter": str(args.segmenter)},
        "separate_pair": summarise(pair, args.resamples),
        "joint_out_of_fold": summarise(joint, args.resamples),
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "compare.md").write_text(render(report))
    return report


def render(report: dict[str, Any]) -> str:
    lines = [
        f"# Separate pair vs joint model on the {report['split']} split (n = {report['n']})",
        "",
        f"Pair: `{report['pair']['classifier']}` + `{report['pair']['segmenter']}`. Joint: "
        "out-of-fold predictions of the 5-fold CV on the same images. 95% bootstrap intervals "
        "over near-duplicate groups.",
        "",
        "| metric | canvas | separate pair | joint (out-of-fold) |",
        "|---|---|---|---|",
    ]
    for key, label in METRIC_ROWS:
        for canvas in CANVASES:
            cells = []
            for who in ("separate_pair", "joint_out_of_fold"):
                fig = report[who][canvas]
                lo, hi = fig["ci95"].get(key, [float("nan"), float("nan")])
                cells.append(f"{fig[key]:.3f} [{lo:.3f}, {hi:.3f}]")
            lines.append(f"| {label} | {canvas} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.command_parser("compare", __doc__)
    cli.add_flag(parser, "--data-path", required=True)
    parser.add_argument("--classifier", type=Path, required=True, help="classification version dir")
    parser.add_argument("--segmenter", type=Path, required=True, help="segmentation version dir")
    parser.add_argument("--oof", type=Path, required=True, help="oof.json of the joint CV")
    parser.add_argument("--split-file", type=Path, default=Path("training/splits/busi.json"))
    parser.add_argument("--split", default="test", help="which split to score (default: test)")
    cli.add_flag(parser, "--output-dir", default=Path("training/reports/compare"))
    cli.add_flag(parser, "--resamples", default=1000)
    return parser.parse_args(argv)


# --- compare-cv: recipes cross-validated on the same folds -------------------------------------

CV_METRICS = (
    ("accuracy", "accuracy"),
    ("macro_f1", "macro-F1"),
    ("macro_auc", "macro AUC"),
    ("malignant_sensitivity", "malignant sensitivity"),
    ("lesion_dice", "lesion Dice"),
    ("normal_with_lesion_segment", "normal drawn /segment"),
    ("normal_with_lesion_diagnose", "normal drawn /diagnose"),
)


def _newest(pattern: str | None, fold: int, task: str) -> ArtifactInfo | None:
    """The newest verified `task` artifact in the model folder `pattern` (with `{fold}`)."""
    from shared.store import verified_artifacts

    if not pattern:
        return None
    folder = Path(pattern.format(fold=fold))
    found = verified_artifacts(folder, task) if (folder / task).is_dir() else []
    return found[-1] if found else None


def _load(info: ArtifactInfo) -> InferenceModel:
    """model.pt, the file the recipes' figures were measured with (shared.inference)."""
    return load_artifact(info, runtime=RUNTIME_TORCHSCRIPT)


def _predict_mask(model: InferenceModel, image: np.ndarray) -> np.ndarray:
    """The served mask on the frame's pixels (bool), one image per forward."""
    (finding,) = predict(model, [image], batch_size=1)
    assert finding.mask is not None
    return finding.mask > 0


def _class_probs(
    info: ArtifactInfo, model: InferenceModel, image: np.ndarray, mask: np.ndarray | None
) -> list[float]:
    """Class probabilities (of the logits, uncalibrated) in CLASS_NAMES; a 4-channel classifier
    gets `mask` (the paired segmenter's prediction, the only mask a service has) as its fourth
    channel."""
    pre = info.manifest.preprocessing
    if info.manifest.input.channels == pre.channels + 1:
        if mask is None:
            raise ValueError(f"{info.path} takes a mask channel; the recipe has no segmenter")
        x, _ = model_input(pre, image)
        m = (pre.resize_image(mask.astype(np.uint8) * 255) > 127).astype(np.float32)
        x = np.concatenate([x, m[None]], axis=0)
        logits = split_outputs(model.spec.outputs, model.forward(x[None])).classes
        assert logits is not None
        row = logits[0]
    else:
        (finding,) = predict(model, [image], batch_size=1)
        assert finding.logits is not None
        row = finding.logits
    probs = dict(zip(info.manifest.class_names, probabilities(row), strict=True))
    return [float(probs[name]) for name in CLASS_NAMES]


def score_recipe(
    name: str, classifier: str | None, segmenter: str | None, folds: dict, data: dict
) -> list[dict[str, Any]]:
    """Rows (one per held-out image of every fold where the recipe has artifacts)."""

    rows = []
    for fold in sorted(set(folds.values())):
        cls_info = _newest(classifier, fold, "classification")
        seg_info = _newest(segmenter, fold, "segmentation")
        if cls_info is None and seg_info is None:
            continue
        cls_model = _load(cls_info) if cls_info else None
        seg_model = _load(seg_info) if seg_info else None
        keys = [k for k, f in folds.items() if f == fold]
        log.info("%s, fold %d: %d held-out images", name, fold, len(keys))
        for key in keys:
            image, truth, label, group = data[key]
            row: dict[str, Any] = {"key": key, "label": label, "group": group, "fold": fold}
            pred = _predict_mask(seg_model, image) if seg_model else None
            if pred is not None:
                row["dice"] = dice_iou(pred, truth > 127)[0]
                row["mask_pixels"] = int(pred.sum())
            if cls_info is not None and cls_model is not None:
                row["probs"] = _class_probs(cls_info, cls_model, image, pred)
            rows.append(row)
    return rows


def cv_main(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    samples = scan_dataset(args.data_path)
    items = json.loads(Path(args.folds_file).read_text())["items"]
    folds = {s.key: int(items[s.key]["fold"]) for s in samples}
    data = {}
    for s in samples:
        image = load_image(s)
        data[s.key] = (image, load_mask(s, image.shape), s.label, int(items[s.key]["group"]))
    joint_rows = {r["key"]: r for r in json.loads(Path(args.oof).read_text())["plain"]}
    recipes: dict[str, Any] = {}
    for spec in args.recipe:
        name, _, paths = spec.partition("=")
        classifier, _, segmenter = paths.partition(",")
        rows = score_recipe(name, classifier or None, segmenter or None, folds, data)
        if not rows:
            log.warning("%s: no artifacts found; left out", name)
            continue
        # the joint model's rows for the same images, with the same half (class / mask) missing
        same = []
        for r in rows:
            twin = {**joint_rows[r["key"]], "group": r["group"]}
            twin.update({k: None for k in ("probs", "dice") if r.get(k) is None})
            same.append(twin)
        recipes[name] = {
            "classifier": classifier or None,
            "segmenter": segmenter or None,
            "classified_folds": sorted({r["fold"] for r in rows if r.get("probs") is not None}),
            "segmented_folds": sorted({r["fold"] for r in rows if r.get("dice") is not None}),
            "n_classified": sum(r.get("probs") is not None for r in rows),
            "n_segmented": sum(r.get("dice") is not None for r in rows),
            "figures": diagnosis_figures(rows),
            "ci95": group_bootstrap(rows, args.resamples),
            "joint_same_images": diagnosis_figures(same),
            "joint_same_images_ci95": group_bootstrap(same, args.resamples),
        }
    all_joint = list(joint_rows.values())
    report = {
        "folds_file": str(args.folds_file),
        "oof": str(args.oof),
        "joint": {
            "folds": sorted({int(r["fold"]) for r in all_joint}),
            "n": len(all_joint),
            "figures": diagnosis_figures(all_joint),
            "ci95": group_bootstrap(all_joint, args.resamples),
        },
        "recipes": recipes,
    }
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / "compare_cv.json").write_text(json.dumps(report, indent=1) + "\n")
    (output / "compare_cv.md").write_text(render_cv(report, args))
    return report


def _cell(figures: dict[str, float], ci: dict[str, list], key: str) -> str:
    value = figures.get(key, float("nan"))
    if value != value:  # NaN: the recipe has no such output
        return "–"
    lo, hi = ci.get(key, [float("nan"), float("nan")])
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def render_cv(report: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# Recipes on the same grouped folds, out-of-fold",
        "",
        f"Folds: `{report['folds_file']}`. Each recipe's models were trained on the other folds "
        "and scored, as the service runs them, on the held-out fold's images; each row is "
        "followed by the joint model's out-of-fold figures on exactly the same images. 95% "
        "bootstrap intervals resample near-duplicate groups. '–': the recipe has no such output.",
        "",
        "| recipe | folds (images) | " + " | ".join(label for _, label in CV_METRICS) + " |",
        "|---|---|" + "---|" * len(CV_METRICS),
    ]
    joint = report["joint"]
    cells = [_cell(joint["figures"], joint["ci95"], key) for key, _ in CV_METRICS]
    folds = ",".join(map(str, joint["folds"]))
    lines.append(
        f"| joint-lite0 (shipped recipe) | {folds} ({joint['n']}) | " + " | ".join(cells) + " |"
    )
    for name, recipe in report["recipes"].items():
        folds = "; ".join(
            f"{what} {','.join(map(str, recipe[what + '_folds']))} ({recipe['n_' + what]})"
            for what in ("classified", "segmented")
            if recipe["n_" + what]
        )
        cells = [_cell(recipe["figures"], recipe["ci95"], key) for key, _ in CV_METRICS]
        lines.append(f"| {name} | {folds} | " + " | ".join(cells) + " |")
        cells = [
            _cell(recipe["joint_same_images"], recipe["joint_same_images_ci95"], key)
            for key, _ in CV_METRICS
        ]
        lines.append("| ↳ joint on the same images | same | " + " | ".join(cells) + " |")
    lines += ["", "Command:", "", "```bash", "python -m training compare-cv " + " ".join(
        args.argv), "```"]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_cv_args(argv: list[str]) -> argparse.Namespace:
    parser = cli.command_parser(
        "compare-cv",
        "Score recipes' per-fold artifacts on their held-out folds beside the joint model's "
        "out-of-fold predictions.",
    )
    cli.add_flag(parser, "--data-path", required=True)
    cli.add_flag(parser, "--folds-file", default=Path("training/splits/busi-5fold.json"))
    parser.add_argument("--oof", type=Path, required=True, help="oof.json of the joint CV")
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        help='"NAME=CLASSIFIER_DIR,SEGMENTER_DIR": model folders with {fold} for the fold '
        "number (either may be empty); the newest verified artifact of each fold is scored",
    )
    cli.add_flag(parser, "--output-dir", default=Path("training/reports/compare"))
    cli.add_flag(parser, "--resamples", default=1000)
    cli.add_flag(parser, "--threads", default=1)
    args = parser.parse_args(argv)
    args.argv = argv
    return args
