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

from service.registry import load_model
from shared.artifacts import ArtifactInfo, verify_artifact
from shared.postprocessing import class_probabilities, dice_iou, sigmoid
from training.data import load_image, load_mask, scan_dataset
from training.joint import CANVASES, METRIC_ROWS, place_on_canvas, summarise

log = logging.getLogger(__name__)


def _artifact(path: Path) -> ArtifactInfo:
    path = Path(path)
    return verify_artifact(path.parents[1], path.parent.name, path.name)


def score_pair(
    classifier_dir: Path, segmenter_dir: Path, images: list, masks: list, samples: list
) -> list[dict[str, Any]]:
    classifier, segmenter = (
        load_model(_artifact(classifier_dir)),
        load_model(_artifact(segmenter_dir)),
    )
    import torch

    rows = []
    with torch.inference_mode():
        for sample, image, truth in zip(samples, images, masks, strict=True):
            x = torch.from_numpy(classifier.preprocessing(image)[None])
            logits = classifier.module(x)[0].numpy()
            probs = class_probabilities(logits, classifier.class_names)
            layout = segmenter.preprocessing.layout(image)
            y = segmenter.preprocessing.normalise(
                segmenter.preprocessing.resize_image(image, layout)
            )
            prob = sigmoid(segmenter.module(torch.from_numpy(y[None]))[0, 0].numpy())
            frame = segmenter.preprocessing.frame_map(prob.astype(np.float32), layout)
            pred = frame > segmenter.threshold
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
    parser = argparse.ArgumentParser(prog="python -m training compare", description=__doc__)
    parser.add_argument("--data-path", type=Path, required=True, help="folder in BUSI layout")
    parser.add_argument("--classifier", type=Path, required=True, help="classification version dir")
    parser.add_argument("--segmenter", type=Path, required=True, help="segmentation version dir")
    parser.add_argument("--oof", type=Path, required=True, help="oof.json of the joint CV")
    parser.add_argument("--split-file", type=Path, default=Path("training/splits/busi.json"))
    parser.add_argument("--split", default="test", help="which split to score (default: test)")
    parser.add_argument("--output-dir", type=Path, default=Path("training/reports/compare"))
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    return parser.parse_args(argv)
