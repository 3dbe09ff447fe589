"""`python -m training <command> ...`: the training jobs' command line.

    python -m training split --data-path D [--output F]      grouped train/val/test split file
    python -m training promote TASK VERSION [--model-dir D]  make a published candidate serve
    python -m training demote TASK [VERSION] [--model-dir D] the one promoted before serves again
    python -m training classify --preset effnet-lite0 ...    train, evaluate, export, publish
    python -m training segment --preset ...                  (training.segmentation)
    python -m training cv --preset joint-lite0 --data-path D grouped 5-fold cross-validation
    python -m training fit --preset joint-lite0 --data-path D train on all images, publish
    python -m training oof --preset joint-lite0 --data-path D out-of-fold logits + features
    python -m training fold-split --fold K --output F        split file whose test set is fold K
    python -m training compare --classifier C --segmenter S --oof O ...  pair vs joint, same images
    python -m training compare-cv --recipe NAME=C,S ... --oof O  recipes on the same folds
    python -m training calibrate --oof F [--output-dir R]    temperature + abstain band from OOF
    python -m training ood --data-path D [--detector-out J]  evaluate and fit the OOD check
    python -m training shortcuts --cv-dir R --data-path D    predictions with marks inpainted
    python -m training export-onnx --version V --data-path D  republish with model.onnx, validated
    python -m training quantize-onnx --version V --data-path D1 D2  int8 graphs, validated
    python -m training drift-reference --version V --data-path D1 D2  republish with the drift
                                                             reference of its training sites
    python -m training add-probe --version V                 republish with model.pt's answers on
                                                             fixed inputs (probe.npz)
    python -m training sites --data-path D1 D2 --holdout site:S  train without a site/scanner/fold,
                                                             score it there, per site
    python -m training sites-report --runs R1 R2 ...         one table of those runs
    python -m training sites-publish --run R --data-path D1 D2 publish a sites run's model
    python -m training sites-ensemble --runs F0 .. F4 --data-path D1 D2  a recipe's fold runs as
                                                             one ensemble, their pooled figures
    python -m training normal-decision --runs R1 R2 ...     class head or mask head decides normal
    python -m training ensemble-gain --runs R1 R2 ...       seeds' networks on a held-out site,
                                                             alone and averaged
    python -m training fold-compare --baseline R0,R1 --candidate R0,R1  two recipes' fold runs
                                                             pooled, with the paired difference

Each command's own `--help` lists its flags and their defaults. The training commands (classify,
segment, cv, fit, oof) share one set of flags (training.cli: --preset, --data-path, --split-file,
--output-dir, --model-dir, --version, --epochs, --batch-size, --lr, --image-size, --seed,
--threads, --device, --resume, --smoke, --no-progress, ...) and one engine (training.engine,
training.runner) with a task plug-in per kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from training import cli
from training.engine import setup_logging

log = logging.getLogger("training")

COMMANDS = (
    "split",
    "classify",
    "segment",
    "cv",
    "fit",
    "oof",
    "fold-split",
    "calibrate",
    "ood",
    "shortcuts",
    "compare",
    "compare-cv",
    "promote",
    "demote",
    "export-onnx",
    "quantize-onnx",
    "drift-reference",
    "add-probe",
    "sites",
    "sites-report",
    "sites-publish",
    "sites-ensemble",
    "normal-decision",
    "ensemble-gain",
    "fold-compare",
)


def get_split_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "split", "Group near-duplicate images and split train/val/test by group."
    )
    cli.add_flag(parser, "--data-path", required=True)
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("split.json"),
        help="split file to write (default: split.json)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    return parser


def split_main(args: argparse.Namespace) -> dict:
    from training.data import make_split, save_split

    document = make_split(args.data_path, seed=args.seed)
    save_split(document, args.output)
    summary = document["summary"]
    log.info(
        "%d images -> %d groups (%d with near-duplicates holding %d images, %d cross-class); "
        "written to %s",
        summary["n_images"],
        summary["n_groups"],
        summary["n_groups_with_duplicates"],
        summary["n_images_in_duplicate_groups"],
        summary["n_cross_class_groups"],
        args.output,
    )
    print(json.dumps(summary, indent=1))
    return document


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    setup_logging()
    if command == "split":
        split_main(get_split_args_parser().parse_args(rest))
    elif command == "classify":
        from training import classification

        classification.main(classification.parse_args(rest))
    elif command == "compare-cv":
        from training.studies import compare

        compare.cv_main(compare.parse_cv_args(rest))
    elif command == "compare":
        from training.studies import compare

        compare.main(compare.parse_args(rest))
    elif command == "fold-split":
        from training.data import DEFAULT_FOLDS_FILE, fold_split

        parser = cli.command_parser("fold-split", "A train/val/test split whose test is one fold.")
        parser.add_argument("--fold", type=int, required=True, help="the fold to hold out")
        cli.add_flag(parser, "--folds-file", default=DEFAULT_FOLDS_FILE)
        parser.add_argument("--output", type=Path, required=True, help="split file to write")
        args = parser.parse_args(rest)
        document = fold_split(json.loads(args.folds_file.read_text()), args.fold)
        args.output.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    elif command in ("cv", "fit", "oof"):
        from training import joint

        if command == "oof":
            joint.oof_main(joint.parse_oof_args(rest))
        elif command == "cv":
            args = joint.parse_cv_args(rest)
            setup_logging(Path(args.output_dir) / "train.log")
            joint.cv_main(args)
        else:
            args = joint.parse_fit_args(rest)
            setup_logging(Path(args.output_dir) / "train.log")
            joint.fit_main(args)
    elif command in ("sites", "sites-report", "sites-publish", "sites-ensemble"):
        from training import sites

        if command == "sites-ensemble":
            from training import ensemble

            args = ensemble.parse_args(rest)
            setup_logging(args.output_dir / "ensemble.log")
            ensemble.ensemble_main(args)
        elif command == "sites":
            args = sites.parse_sites_args(rest)
            setup_logging(Path(args.output_dir) / "train.log")
            sites.sites_main(args)
        elif command == "sites-publish":
            print(json.dumps(sites.publish_main(sites.parse_publish_args(rest)), indent=1))
        else:
            print(sites.report_main(sites.parse_report_args(rest)))
    elif command in ("promote", "demote"):
        from training import promote

        return promote.main(command, rest)
    elif command == "export-onnx":
        from training import export_onnx

        return export_onnx.main(rest)
    elif command == "quantize-onnx":
        from training import quantize

        return quantize.main(rest)
    elif command == "drift-reference":
        from training import drift_reference

        return drift_reference.main(rest)
    elif command == "add-probe":
        from training import add_probe

        return add_probe.main(rest)
    elif command == "ensemble-gain":
        from training.studies import ensemble_gain

        print(ensemble_gain.main(rest))
    elif command == "fold-compare":
        from training.studies import fold_compare

        print(fold_compare.main(rest))
    elif command in ("calibrate", "ood", "shortcuts", "normal-decision"):
        from training.studies import calibration, normal_decision, ood, shortcuts

        module = {
            "calibrate": calibration,
            "ood": ood,
            "shortcuts": shortcuts,
            "normal-decision": normal_decision,
        }[command]
        module.main(module.parse_args(rest))
    else:
        from training import segmentation

        segmentation.main(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
