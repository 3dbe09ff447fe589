"""Short Markdown reports of a run, written beside its metrics.json and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"accuracy": 0.88, "macro_f1": 0.85, "macro_auc": 0.95, "malignant_recall": 0.85}


def _fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    if value is None:
        return "n/a"
    if ci and ci[0] is not None:
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def headline_rows(metrics: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(label, formatted value with CI, raw value) for the target metrics of one split."""
    ci = metrics.get("ci95", {})
    malignant = metrics["per_class"]["malignant"]
    return [
        ("accuracy", _fmt(metrics["accuracy"], ci.get("accuracy")), metrics["accuracy"]),
        ("macro-F1", _fmt(metrics["macro_f1"], ci.get("macro_f1")), metrics["macro_f1"]),
        (
            "macro one-vs-rest AUC",
            _fmt(metrics["macro_auc"], ci.get("macro_auc")),
            metrics["macro_auc"],
        ),
        (
            "malignant sensitivity",
            _fmt(malignant["recall"], ci.get("malignant_recall")),
            malignant["recall"],
        ),
    ]


def write_classification_report(
    path: Path, document: dict[str, Any], command: str | None = None
) -> Path:
    """report.md: the test table against the targets, per-class numbers, confusion matrices."""
    cfg = document["training"]
    names = document["class_names"]
    lines = [
        f"# Classification run: `{cfg['preset']}`",
        "",
        f"Architecture `{cfg['architecture']}`, input {cfg['crop'] or cfg['resize']} px, "
        f"ImageNet weights loaded: {cfg['pretrained_loaded']}, mask channel: "
        f"{cfg['mask_channel']}. Best epoch {cfg['best_epoch']} of {cfg['epochs_run']} "
        f"(chosen on {cfg['select_on']}, validation split only); training time "
        f"{cfg['train_seconds'] / 60:.1f} min on {cfg['threads']} CPU threads; seed {cfg['seed']}.",
        "",
    ]
    if cfg.get("smoke"):
        lines += ["**Smoke run** (tiny subset, 1 epoch): the numbers mean nothing.", ""]
    if cfg["mask_channel"] == "ground-truth":
        lines += [
            "**Ground-truth mask channel: these numbers include the label leak** (normal "
            "images have empty masks) and do not describe a deployable model.",
            "",
        ]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    test, val = document["test"], document["validation"]
    lines += [
        f"## Test split (n = {test['n']}, evaluated once), 95% bootstrap intervals",
        "",
        "| metric | test | target | met | validation |",
        "|---|---|---|---|---|",
    ]
    target_keys = ("accuracy", "macro_f1", "macro_auc", "malignant_recall")
    for (label, text, raw), key, (_, vtext, _) in zip(
        headline_rows(test), target_keys, headline_rows(val), strict=True
    ):
        met = "yes" if raw is not None and raw >= TARGETS[key] else "no"
        lines.append(f"| {label} | {text} | >= {TARGETS[key]:.2f} | {met} | {vtext} |")
    lines += [
        "",
        "Per class (test):",
        "",
        "| class | precision | recall | F1 | AUC | n |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        pc = test["per_class"][name]
        lines.append(
            f"| {name} | {_fmt(pc['precision'])} | {_fmt(pc['recall'])} | "
            f"{_fmt(pc['f1'])} | {_fmt(pc['auc'])} | {pc['support']} |"
        )
    lines += [
        "",
        "Confusion matrix (test; rows true, columns predicted):",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for name, row in zip(names, test["confusion_matrix"], strict=True):
        lines.append(f"| **{name}** | " + " | ".join(str(v) for v in row) + " |")
    lines += [
        "",
        "Plots: `confusion_test.png`, `roc_test.png`, `loss_curves.png`, `samples_test.png` "
        "(and the `_val` versions).",
        "",
    ]
    if test["accuracy"] is not None and test["accuracy"] > 0.95 and not cfg.get("smoke"):
        lines += ["**Accuracy above 0.95: check for leakage before believing it.**", ""]
    Path(path).write_text("\n".join(lines))
    return Path(path)
