"""The flags every training command shares: one name, one meaning and one help text per flag.

    parser = training_parser(
        "python -m training classify", "Train ... a classifier.",
        presets=PRESETS, default_preset="effnet-lite0",
        default_output="runs/classification/<preset>",
    )
    parser.add_argument(...)            # the command's own flags
    args = parse(parser, argv, "classify")

The common flags (each command's `--help` states its defaults):

    --preset --data-path --split-file --output-dir --model-dir --version
    --epochs --batch-size --lr --image-size --no-pretrained
    --seed --threads --device --workers --resume --smoke --max-per-class --bootstrap --no-progress

`--size` is the deprecated spelling of `--image-size` (the segmentation and joint jobs had it);
`--subset`, `--folds-file` and `--resamples` stay as the joint commands' old names of
`--max-per-class`, `--split-file` and `--bootstrap`. A command leaves out what it has no use for:
`cv` and `oof` publish nothing (no `--model-dir`), `fit` trains on every image (no split file).

Every other command (split, fold-split, the studies, export-onnx, drift-reference, promote)
starts from `command_parser` and takes the flags it shares with the others through `add_flag`,
with the same meaning and help text:

    parser = command_parser("ood", "Evaluate and fit the image-statistics OOD detector.")
    add_flag(parser, "--data-path")
    add_flag(parser, "--output-dir", default=Path("training/reports/quality"))
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
# What --smoke sets (each task also shrinks its preset): few images, few bootstrap draws.
SMOKE_BOOTSTRAP = 200


class _Alias(argparse.Action):
    """Store the value; an old spelling of the flag logs that it is deprecated."""

    def __init__(self, *args: Any, deprecated: Iterable[str] = (), **kwargs: Any) -> None:
        self.deprecated = set(deprecated)
        super().__init__(*args, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string in self.deprecated:
            log.warning("%s is deprecated: use %s", option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m training <command>`, for a command without the training flags."""
    return argparse.ArgumentParser(prog=f"python -m training {command}", description=description)


# The flags the other commands share: one meaning and help text each (the default is added).
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "--data-path": {"type": Path, "help": "folder in BUSI layout (<class>/<name>.png + masks)"},
    "--output-dir": {"type": Path, "help": "report folder"},
    "--folds-file": {"type": Path, "help": "the grouped k-fold file"},
    "--model-dir": {"type": Path, "help": "the model directory of the source version"},
    "--threads": {"type": int, "help": "torch (and ONNX Runtime) threads; 0: torch's default"},
    "--resamples": {"type": int, "help": "bootstrap resamples for the 95%% intervals"},
}


def add_republish_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a command that publishes a verified version again as a new one (export-onnx,
    drift-reference, add-probe): --model-dir, --task, --version, --output-model-dir and
    --new-version."""
    from shared.labels import TASK_DIAGNOSIS, TASKS

    add_flag(parser, "--model-dir", default=Path("models"))
    parser.add_argument("--task", choices=TASKS, default=TASK_DIAGNOSIS, help="default: diagnosis")
    parser.add_argument("--version", required=True, help="the source version (folder name)")
    parser.add_argument(
        "--output-model-dir",
        type=Path,
        default=None,
        help="where to publish the new version (default: --model-dir)",
    )
    parser.add_argument(
        "--new-version", default=None, help="the new version's name (default: UTC time)"
    )


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any = None,
    required: bool = False,
    help: str | None = None,
    **kwargs: Any,
) -> None:
    """Add one of SHARED_FLAGS with its meaning and help text: required, or with `default`
    (stated in the help). `help` replaces the shared text's detail after a semicolon; `kwargs`
    go to argparse (e.g. nargs="+")."""
    spec = SHARED_FLAGS[flag]
    text = spec["help"] + (f"; {help}" if help else "")
    if required:
        text += "; required"
    else:
        shown = "none" if default is None else default
        if isinstance(default, Path) and default.is_relative_to(REPO):
            shown = default.relative_to(REPO)  # e.g. training/splits/busi-5fold.json
        text += f" (default: {shown})"
    options = {"type": spec["type"], **kwargs}
    if required:
        parser.add_argument(flag, required=True, help=text, **options)
    else:
        parser.add_argument(flag, default=default, help=text, **options)


def training_parser(
    prog: str,
    description: str,
    *,
    presets: Mapping[str, Any],
    default_preset: str,
    default_output: str,
    split_file: Path | None | bool = None,
    split_help: str = "",
    model_dir: Path | None | bool = None,
    threads: int = 0,
    bootstrap: int = 2000,
    aliases: Mapping[str, Sequence[str]] | None = None,
    multi_data: bool = False,
) -> argparse.ArgumentParser:
    """An argparse parser holding the common flags of a training command.

    `split_file=False` / `model_dir=False` leave `--split-file` / `--model-dir` out (a command
    that uses every image / publishes nothing); otherwise the value is the flag's default.
    `aliases` maps a common flag to extra (older) spellings, e.g. {"--bootstrap": ["--resamples"]}.
    `multi_data` makes `--data-path` take one or more folders, one per site (training.sites).
    """
    aliases = aliases or {}
    parser = argparse.ArgumentParser(prog=prog, description=description)

    def add(flag: str, **kwargs: Any) -> None:
        parser.add_argument(flag, *aliases.get(flag, ()), **kwargs)

    add(
        "--preset",
        default=default_preset,
        choices=sorted(presets),
        help=f"recipe (default: {default_preset})",
    )
    add(
        "--data-path",
        type=Path,
        required=True,
        nargs="+" if multi_data else None,
        help="folder in BUSI layout (<class>/<name>.png + <name>_mask.png); required"
        + ("; one or more, a folder per site" if multi_data else ""),
    )
    if split_file is not False:
        add(
            "--split-file",
            type=Path,
            default=split_file,
            help=split_help or f"split file (default: {split_file})",
        )
    add(
        "--output-dir",
        type=Path,
        default=None,
        help=f"run folder: log, checkpoints, metrics, report (default: {default_output})",
    )
    if model_dir is not False:
        add(
            "--model-dir",
            type=Path,
            default=model_dir,
            help="publish the verified TorchScript artifact into this model directory as "
            f"<model-dir>/<task>/<version>/ (default: {model_dir or 'none, do not publish'})",
        )
        add(
            "--version",
            default=None,
            help="artifact version name (default: UTC time, e.g. 20260101T120000Z)",
        )
    add("--epochs", type=int, default=None, help="number of epochs (default: the preset's)")
    add("--batch-size", type=int, default=None, help="training batch size (default: the preset's)")
    add("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    parser.add_argument(
        "--image-size",
        "--size",
        dest="image_size",
        type=int,
        default=None,
        action=_Alias,
        deprecated=("--size",),
        help="model input side in pixels (default: the preset's); --size is a deprecated alias",
    )
    add(
        "--no-pretrained",
        action="store_true",
        help="start from random weights (default: the preset's choice)",
    )
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add(
        "--threads",
        type=int,
        default=threads,
        help=f"torch intra-op threads; 0: torch's default (default: {threads})",
    )
    add(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N; auto: CUDA when available, else the CPU; under torchrun "
        "each process uses its own (default: auto)",
    )
    add(
        "--workers",
        type=int,
        default=0,
        help="data-loader worker processes (default: 0, load in the main process)",
    )
    add(
        "--resume",
        type=Path,
        default=None,
        help="checkpoint to continue from, e.g. <output-dir>/checkpoint.pt (default: none)",
    )
    add(
        "--smoke",
        action="store_true",
        help="a run of seconds to check the plumbing: a few images per class, 1 epoch, tiny "
        f"input, no pretrained weights, {SMOKE_BOOTSTRAP} bootstrap draws (default: off)",
    )
    add(
        "--max-per-class",
        type=int,
        default=None,
        help="use at most this many images per class (and split) (default: all)",
    )
    add(
        "--bootstrap",
        type=int,
        default=bootstrap,
        help=f"bootstrap resamples for the 95%% intervals (default: {bootstrap})",
    )
    add("--no-progress", action="store_true", help="no progress bars (default: show them)")
    parser.set_defaults(bootstrap_default=bootstrap)
    return parser


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: str
) -> argparse.Namespace:
    """Parse `argv`; record the command line (`args.command_line`) and apply --smoke's
    bootstrap default."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = command
    args.command_line = command_line(command, argv)
    if args.smoke and args.bootstrap == args.bootstrap_default:
        args.bootstrap = SMOKE_BOOTSTRAP
    return args


def command_line(command: str, argv: Sequence[str]) -> str:
    """The command as a user would type it again: `python -m training <command> ...`."""
    return f"python -m training {command} " + shlex.join(argv)


def recipe_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe flags given on the command line: epochs, batch_size, lr, image_size."""
    names = ("epochs", "batch_size", "lr", "image_size")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
