"""The engine's task plug-in contract, the common flags and the one finishing step.

A toy task written here (a 2-layer CNN classifier on 16-px synthetic scans) plugs into
training.runner.run_task; the run must come out like any other: checkpoint.pt and best.pt,
metrics.json in the common layout, report.md with the frame and the task's section, a verified
artifact. Its variant without a validation split (as the joint task) runs through the same
engine as a refit on every image and through the generic cross-validation driver
(training.crossval). The real plug-ins must answer the same contract.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic_busi import write_busi_folder
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASKS
from shared.preprocessing import Preprocessing
from shared.store import list_versions, verify_artifact
from training import classification, cli, crossval, engine, joint, runner, segmentation
from training.data import LoadedSplit
from training.metrics import group_bootstrap

PLUG_INS = [classification.CLASSIFICATION, segmentation.SEGMENTATION, joint.JOINT]
TRAINING_COMMANDS = {
    "classify": classification.parse_args,
    "segment": segmentation.parse_args,
    "cv": joint.parse_cv_args,
    "fit": joint.parse_fit_args,
    "oof": joint.parse_oof_args,
}
COMMON_DESTS = {
    "preset", "data_path", "output_dir", "epochs", "batch_size", "lr", "image_size",
    "no_pretrained", "seed", "threads", "device", "workers", "resume", "smoke",
    "max_per_class", "bootstrap", "no_progress", "command_line",
}  # fmt: skip


@dataclass(frozen=True)
class ToyPreset:
    size: int = 16
    epochs: int = 2
    batch_size: int = 4
    lr: float = 0.05
    description: str = "toy task of the plug-in contract test"


class ToyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, len(CLASS_NAMES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _tensors(data: LoadedSplit, pre: Preprocessing) -> TensorDataset:
    x = torch.stack([torch.from_numpy(pre(im)) for im in data.images])
    return TensorDataset(x, torch.tensor(data.labels))


class ToyTask:
    """The smallest plug-in: mean-pooled conv features -> class logits."""

    kind = TASK_CLASSIFICATION
    command = "toy"
    presets = {"toy": ToyPreset()}
    default_output = "runs/toy-{preset}"
    smoke_per_class = 2
    validation_split = True

    def resolve_preset(self, args: argparse.Namespace) -> ToyPreset:
        overrides = cli.recipe_overrides(args)
        overrides.pop("image_size", None)
        return ToyPreset(**overrides)

    def preprocessing(self, preset: ToyPreset) -> Preprocessing:
        return Preprocessing(resize=preset.size, resize_mode="stretch")

    def datasets(self, run: runner.Run) -> tuple[Dataset, Dataset]:
        run.state["test"] = _tensors(run.data["test"], run.preprocessing)
        return (
            _tensors(run.data["train"], run.preprocessing),
            _tensors(run.data["val"], run.preprocessing),
        )

    def build_model(self, run: runner.Run) -> nn.Module:
        return ToyNet()

    def build_loss(self, run: runner.Run) -> nn.Module:
        return nn.CrossEntropyLoss()

    def build_optimizer(
        self, run: runner.Run, model: nn.Module, steps_per_epoch: int
    ) -> tuple[torch.optim.Optimizer, Any, str]:
        optimizer = torch.optim.SGD(model.parameters(), lr=run.preset.lr)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5), "epoch"

    def selection(self, preset: ToyPreset) -> engine.Selection:
        return engine.Selection("val_accuracy")

    def validate(self, out: engine.EvalOutput, data: LoadedSplit) -> dict[str, float]:
        return {"val_accuracy": float((out.outputs.argmax(1) == out.targets).float().mean())}

    def evaluate(self, run: runner.Run, model: nn.Module) -> runner.Evaluation:
        splits = {}
        val = _tensors(run.data["val"], run.preprocessing)
        sets = {"validation": val, "test": run.state["test"]}
        for key, data in sets.items():
            out = engine.evaluate(model, None, run.eval_loader(data), progress=False)
            splits[key] = {"accuracy": float((out.outputs.argmax(1) == out.targets).float().mean())}
        return runner.Evaluation(
            served=model,
            example=run.state["test"].tensors[0][:1],
            name="toy",
            architecture="toy_net",
            output={"type": "logits", "shape": [len(CLASS_NAMES)]},
            metrics=splits,
            splits=splits,
            extra={"toy_field": 1},
        )

    def report_section(self, document: dict[str, Any]) -> list[str]:
        return [f"Toy test accuracy {document['test']['accuracy']:.3f}.", ""]


class ToyRefitTask(ToyTask):
    """The toy without a validation split, as the joint task: every image trains, the last
    epoch is kept, and cross-validation scores it (the driver's hooks: score, figures,
    summarise, render_cv_report)."""

    command = "toy-refit"
    validation_split = False

    def datasets(self, run: runner.Run) -> tuple[Dataset, None]:
        return _tensors(run.data["train"], run.preprocessing), None

    def selection(self, preset: ToyPreset) -> engine.Selection:
        return engine.Selection(None)

    def evaluate(self, run: runner.Run, model: nn.Module) -> runner.Evaluation:
        return runner.Evaluation(
            served=model,
            example=torch.zeros(1, 3, 16, 16),
            name="toy-refit",
            architecture="toy_net",
            output={"type": "logits", "shape": [len(CLASS_NAMES)]},
            metrics={"kind": "none"},
        )

    def report_section(self, document: dict[str, Any]) -> list[str]:
        return ["Refit on every image.", ""]

    def score(
        self, run: runner.Run, model: nn.Module, data: LoadedSplit
    ) -> dict[str, list[dict[str, Any]]]:
        out = engine.evaluate(
            model, None, run.eval_loader(_tensors(data, run.preprocessing)), progress=False
        )
        probs = torch.softmax(out.outputs, dim=1).tolist()
        pairs = zip(data.samples, probs, strict=True)
        return {"plain": [{"key": s.key, "label": s.label, "probs": p} for s, p in pairs]}

    def figures(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        hits = [max(range(len(r["probs"])), key=r["probs"].__getitem__) == r["label"] for r in rows]
        return {"accuracy": sum(hits) / len(hits) if hits else float("nan")}

    def summarise(self, rows_by_view: dict[str, list], n_resamples: int) -> dict[str, Any]:
        return {
            view: {
                "n": len(rows),
                **self.figures(rows),
                "ci95": group_bootstrap(rows, n_resamples, figures=self.figures),
            }
            for view, rows in rows_by_view.items()
        }

    def render_cv_report(self, report: dict[str, Any]) -> str:
        return f"# Toy cross-validation\n\naccuracy {report['pooled']['plain']['accuracy']:.3f}\n"


def _toy_args(data: Path, out: Path, *extra: str, cv: bool = False) -> argparse.Namespace:
    parser = cli.training_parser(
        "toy", "toy", presets=ToyTask.presets, default_preset="toy", default_output="runs/toy"
    )
    if cv:  # the cross-validation command's own flags (training.joint.parse_cv_args)
        parser.add_argument("--folds", type=int, nargs="*", default=None)
        parser.add_argument("--report-only", action="store_true")
    argv = ["--data-path", str(data), "--output-dir", str(out), "--split-file",
            str(out.parent / "split.json"), "--no-progress", "--threads", "1", *extra]  # fmt: skip
    return cli.parse(parser, argv, "toy")


def test_a_new_task_is_one_plug_in_and_its_run_comes_out_like_every_other(tmp_path: Path):
    data = write_busi_folder(tmp_path / "busi", per_class=6)
    out, registry = tmp_path / "run", tmp_path / "models"
    args = _toy_args(data, out, "--model-dir", str(registry), "--version", "toy-1")
    document = runner.run_task(ToyTask(), args)

    for name in ("checkpoint.pt", "best.pt", "metrics.json", "report.md", "loss_curves.png",
                 "train.log"):  # fmt: skip
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(runner.json_ready(document)))
    assert {"task", "preset", "description", "command", "class_names", "training", "history",
            "validation", "test", "data_fingerprint", "artifact"} <= set(metrics)  # fmt: skip
    assert metrics["toy_field"] == 1  # the task's own fields sit beside the common ones
    training = metrics["training"]
    assert training["epochs_run"] == 2 and 1 <= training["best_epoch"] <= 2
    assert training["selection"] == "best val_accuracy (max)" and training["device"] == "cpu"
    assert metrics["command"].startswith("python -m training toy ")
    epochs = metrics["history"]["epochs"]
    assert [set(row) for row in epochs] == [
        {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    ] * 2
    assert epochs[1]["lr"] == pytest.approx(epochs[0]["lr"] / 2)  # the epoch-wise scheduler

    report = (out / "report.md").read_text()
    assert report.startswith("# Classification run: `toy`")
    assert "Artifact: classification/toy-1" in report and "Toy test accuracy" in report

    assert list_versions(registry, TASK_CLASSIFICATION) == ["toy-1"]
    info = verify_artifact(registry, TASK_CLASSIFICATION, "toy-1")
    assert metrics["artifact"]["sha256"] == info.sha256
    assert info.metadata["training"]["history"] == metrics["history"]
    scripted = torch.jit.load(str(info.model_path))
    best = ToyNet()
    best.load_state_dict(torch.load(out / "best.pt", weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(x), best.eval()(x))  # what ships is the kept epoch

    # --resume with more epochs continues the history; --test-only re-evaluates the kept weights
    more = _toy_args(data, out, "--epochs", "3", "--resume", str(out / "checkpoint.pt"))
    again = runner.run_task(ToyTask(), more)
    assert [row["epoch"] for row in again["history"]["epochs"]] == [1, 2, 3]
    assert again["artifact"] is None and Path(again["torchscript"]).is_file()


def test_a_task_without_a_validation_split_refits_and_cross_validates_on_the_engine(tmp_path):
    data = write_busi_folder(tmp_path / "busi", per_class=6)
    out, registry = tmp_path / "fit", tmp_path / "models"
    args = _toy_args(data, out, "--model-dir", str(registry), "--version", "refit-1")
    document = runner.run_task(ToyRefitTask(), args)
    training = document["training"]
    assert training["train_images"] == 18 and document["split_sizes"] == {"train": 18}
    assert training["selection"] == "the last epoch" and training["best_epoch"] == 2
    assert [set(row) for row in document["history"]["epochs"]] == [
        {"epoch", "train_loss", "lr", "seconds"}
    ] * 2  # no validation pass
    assert list_versions(registry, TASK_CLASSIFICATION) == ["refit-1"]
    best = ToyNet()
    best.load_state_dict(torch.load(out / "best.pt", weights_only=True))
    scripted = torch.jit.load(
        str(verify_artifact(registry, TASK_CLASSIFICATION, "refit-1").model_path)
    )
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(scripted(x), best.eval()(x))  # what ships is the last epoch

    cv_dir = tmp_path / "cv"
    argv = ("--bootstrap", "20")
    first = crossval.cross_validate(
        ToyRefitTask(), _toy_args(data, cv_dir, *argv, "--folds", "0", cv=True)
    )
    assert first == {"folds_done": 1} and (cv_dir / "fold0.pt").is_file()
    assert not (cv_dir / "fold0.ckpt").exists()
    report = crossval.cross_validate(ToyRefitTask(), _toy_args(data, cv_dir, *argv, cv=True))
    folds = json.loads((tmp_path / "split.json").read_text())  # the data layer's grouped folds
    assert report["k"] == folds["k"] == 5 and len(report["per_fold"]) == 5
    oof = json.loads((cv_dir / "oof.json").read_text())["plain"]
    assert sorted(row["key"] for row in oof) == sorted(folds["items"])  # each image once
    for row in oof:  # scored by the model that did not train on it, its group carried
        assert row["fold"] == folds["items"][row["key"]]["fold"]
        assert row["group"] == folds["items"][row["key"]]["group"]
    assert report["pooled"]["plain"]["n"] == 18
    assert (cv_dir / "report.md").read_text().startswith("# Toy cross-validation")


ENGINE_HOOKS = (
    "resolve_preset", "preprocessing", "datasets", "build_model", "build_loss", "build_optimizer",
    "selection", "validate", "evaluate", "report_section",
)  # fmt: skip
CROSS_VALIDATION_HOOKS = ("score", "figures", "summarise", "render_cv_report")


@pytest.mark.parametrize("task", [*PLUG_INS, ToyTask(), ToyRefitTask()], ids=lambda t: t.command)
def test_every_plug_in_declares_what_the_engine_needs(task):
    assert task.kind in TASKS
    assert task.presets and "{preset}" in task.default_output and task.smoke_per_class > 0
    assert isinstance(task.validation_split, bool)
    for name in ENGINE_HOOKS:
        assert callable(getattr(task, name)), name
    if not task.validation_split:  # its figures can only come from cross-validation
        for name in CROSS_VALIDATION_HOOKS:
            assert callable(getattr(task, name)), name
    preset = next(iter(task.presets.values()))
    assert isinstance(task.preprocessing(preset), Preprocessing)
    assert isinstance(task.selection(preset), engine.Selection)
    if not task.validation_split:
        assert task.selection(preset).metric is None  # nothing to select on: the last epoch


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_every_training_command_takes_the_common_flags(command, tmp_path):
    args = TRAINING_COMMANDS[command](
        ["--data-path", str(tmp_path), "--epochs", "3", "--batch-size", "8", "--lr", "0.01",
         "--image-size", "96", "--seed", "4", "--threads", "1", "--device", "cpu", "--smoke",
         "--no-progress", "--max-per-class", "2", "--resume", str(tmp_path / "c.pt")]
    )  # fmt: skip
    assert COMMON_DESTS <= set(vars(args))
    assert (args.epochs, args.batch_size, args.lr, args.image_size) == (3, 8, 0.01, 96)
    assert args.command_line.startswith(f"python -m training {command} --data-path")
    assert args.bootstrap == cli.SMOKE_BOOTSTRAP  # --smoke's default, unless given


def test_image_size_is_one_flag_and_size_its_deprecated_alias(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.cli"):
        old = segmentation.parse_args(["--data-path", str(tmp_path), "--size", "48"])
    assert old.image_size == 48 and "--size is deprecated" in caplog.text
    assert segmentation.resolve_preset(old).size == 48
    new = classification.parse_args(["--data-path", str(tmp_path), "--image-size", "48"])
    assert (classification.CLASSIFICATION.resolve_preset(new).resize, new.image_size) == (48, 48)
    fit = joint.parse_fit_args(["--data-path", str(tmp_path), "--size", "96"])
    assert joint.resolve_preset(fit).size == 96


def test_joint_commands_keep_their_older_flag_names(tmp_path):
    args = joint.parse_cv_args(
        ["--data-path", str(tmp_path), "--folds-file", "f.json", "--subset", "3",
         "--resamples", "20"]
    )  # fmt: skip
    assert (args.split_file, args.max_per_class, args.bootstrap) == (Path("f.json"), 3, 20)


def test_presets_train_the_recipes_they_always_did():
    # the shipped model's recipe, field by field (training.joint.JointPreset's defaults)
    lite0 = joint.get_preset("joint-lite0")
    assert (lite0.encoder, lite0.size, lite0.epochs, lite0.batch_size) == (
        "efficientnet_lite0", 224, 20, 16,
    )  # fmt: skip
    assert (lite0.lr, lite0.weight_decay, lite0.pct_start, lite0.label_smoothing) == (
        1e-3, 1e-4, 0.15, 0.1,
    )  # fmt: skip
    assert (lite0.class_weighted, lite0.mask_weight, lite0.freeze_stem_stages, lite0.dropout) == (
        True, 1.0, 2, 0.2,
    )  # fmt: skip
    assert (lite0.aspect_p, lite0.margin_p, lite0.flip_tta, lite0.threshold) == (
        0.5, 0.3, True, 0.5,
    )  # fmt: skip
    args = joint.parse_fit_args(["--data-path", "d"])
    assert joint.resolve_preset(args) == lite0  # no flag: the preset as it is
