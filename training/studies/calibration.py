"""Calibration and the abstain band, fitted on out-of-fold logits and reported with cross-fitting.

    python -m training calibrate --oof training/reports/cv/joint-lite0/oof_logits.json \
        --output-dir training/reports/calibration/joint-lite0

`--oof` is {"rows": [{"key", "label", "fold", "group", "logits": [K floats, as served]}, ...]},
each image scored by the fold model that did not train on it. Rows without "fold" (the held-out
images of one model, training.sites' rows.json) are cross-fitted over CROSSFIT_PARTS parts made
of whole groups (patients, near-duplicate groups): `crossfit_part`.

Cross-fitting keeps the reported "after" figures honest: for each fold f the calibration (and the
abstain threshold) is fitted on the other folds' rows and applied to fold f, so no row is scored
by parameters fitted on itself. The parameters that go into the manifest are then fitted on all
rows with the same recipe (written to `manifest.json`, to be merged into the artifact's
`output.classes`, see `manifest_fields`).

Temperature scaling is the default; vector scaling (a factor and a bias per class) is chosen only
when its cross-fitted negative log-likelihood beats the temperature's by at least
`VECTOR_MIN_NLL_GAIN` nats and its cross-fitted ECE is not worse.

Measures: ECE with 15 equal-width bins on the top-label confidence; per class, the classwise ECE
(15 bins of p_k against 1[y = k]) and Brier score (mean (p_k - 1[y = k])^2); the multiclass Brier
is their sum. Abstain band: a prediction is "uncertain" when its top calibrated probability is
under a threshold set to give `COVERAGE` (90%) coverage on the fitting rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from shared.calibration import Calibration
from shared.labels import CLASS_NAMES
from shared.postprocessing import softmax
from training import cli

log = logging.getLogger(__name__)

N_BINS = 15
COVERAGE = 0.90
VECTOR_MIN_NLL_GAIN = 0.01


# --- measures ----------------------------------------------------------------------------------


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error: bin-weighted |accuracy - confidence| over equal-width bins."""
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(total)


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS
) -> list[dict[str, float]]:
    bins = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            out.append(
                {
                    "low": b / n_bins,
                    "high": (b + 1) / n_bins,
                    "n": int(in_bin.sum()),
                    "confidence": float(confidence[in_bin].mean()),
                    "observed": float(correct[in_bin].mean()),
                }
            )
    return out


def calibration_figures(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """ECE, Brier, NLL and accuracy, overall and per class."""
    onehot = np.eye(probs.shape[1])[labels]
    top = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    per_class = {
        name: {
            "ece": ece(probs[:, k], onehot[:, k]),
            "brier": float(((probs[:, k] - onehot[:, k]) ** 2).mean()),
        }
        for k, name in enumerate(CLASS_NAMES[: probs.shape[1]])
    }
    return {
        "ece": ece(top, correct),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "nll": nll(probs, labels),
        "accuracy": float(correct.mean()),
        "mean_confidence": float(top.mean()),
        "per_class": per_class,
    }


# --- fitting -----------------------------------------------------------------------------------


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """The T > 0 minimising the NLL of softmax(logits / T)."""

    def loss(log_t: float) -> float:
        return nll(softmax(logits / np.exp(log_t)), labels)

    result = minimize_scalar(loss, bounds=(-3.0, 3.0), method="bounded")
    return Calibration(temperature=float(np.exp(result.x)), calibrated=True)


def fit_vector(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Per-class factor and bias minimising the NLL of softmax(logits * a + b)."""
    k = logits.shape[1]
    start = fit_temperature(logits, labels)

    def loss(params: np.ndarray) -> float:
        return nll(softmax(logits * params[:k] + params[k:]), labels)

    x0 = np.concatenate([np.full(k, 1.0 / start.temperature), np.zeros(k)])
    result = minimize(loss, x0, method="L-BFGS-B")
    scale, bias = result.x[:k], result.x[k:]
    bias = bias - bias.mean()  # softmax is shift-invariant: store the centred form
    return Calibration(
        temperature=1.0,
        scale=tuple(float(v) for v in scale),
        bias=tuple(float(v) for v in bias),
        calibrated=True,
    )


FITTERS = {"temperature": fit_temperature, "vector": fit_vector}


def top_threshold(probs: np.ndarray, coverage: float = COVERAGE) -> float:
    """The top-probability threshold under which (1 - coverage) of these rows fall."""
    return float(np.quantile(probs.max(axis=1), 1.0 - coverage))


def cross_fit(
    logits: np.ndarray, labels: np.ndarray, folds: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Calibrated probabilities of each fold's rows from parameters fitted on the other folds,
    the per-row abstain thresholds fitted the same way, and the per-fold parameters."""
    probs = np.zeros_like(logits, dtype=np.float64)
    thresholds = np.zeros(len(labels))
    params = []
    for fold in sorted(set(folds.tolist())):
        train, test = folds != fold, folds == fold
        calibration = FITTERS[method](logits[train], labels[train])
        probs[test] = softmax(calibration.apply(logits[test]))
        threshold = top_threshold(softmax(calibration.apply(logits[train])))
        thresholds[test] = threshold
        params.append(
            {"fold": int(fold), **calibration.to_manifest(), "uncertain_below": threshold}
        )
    return probs, thresholds, params


def coverage_table(probs: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Accuracy on the most confident rows at several coverages (a descriptive curve)."""
    order = np.argsort(-probs.max(axis=1), kind="stable")
    correct = (probs.argmax(axis=1) == labels)[order]
    rows = []
    for coverage in (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
        n = max(1, int(round(coverage * len(labels))))
        rows.append({"coverage": coverage, "n": n, "accuracy": float(correct[:n].mean())})
    return rows


CROSSFIT_PARTS = 5


def crossfit_part(row: dict[str, Any]) -> int:
    """The cross-fitting part of a row: its fold, else a stable hash of its group."""
    if "fold" in row:
        return int(row["fold"])
    return zlib.crc32(str(row["group"]).encode()) % CROSSFIT_PARTS


def calibrate(rows: list[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The whole analysis on OOF rows; returns the report (figures, choice, manifest fields).
    `only` ("temperature" or "vector") skips the choice; temperature scaling never changes the
    argmax, so the class decisions stay those the figures were measured on."""
    logits = np.asarray([r["logits"] for r in rows], dtype=np.float64)
    labels = np.asarray([int(r["label"]) for r in rows])
    folds = np.asarray([crossfit_part(r) for r in rows])
    raw = softmax(logits)
    before = calibration_figures(raw, labels)
    crossfitted = {}
    for method in FITTERS:
        probs, thresholds, params = cross_fit(logits, labels, folds, method)
        crossfitted[method] = (probs, thresholds, params, calibration_figures(probs, labels))
    t_fig, v_fig = crossfitted["temperature"][3], crossfitted["vector"][3]
    use_vector = t_fig["nll"] - v_fig["nll"] >= VECTOR_MIN_NLL_GAIN and v_fig["ece"] <= t_fig["ece"]
    method = only or ("vector" if use_vector else "temperature")
    probs, thresholds, params, after = crossfitted[method]

    answered = probs.max(axis=1) >= thresholds
    correct = probs.argmax(axis=1) == labels
    final = FITTERS[method](logits, labels)
    final_threshold = top_threshold(softmax(final.apply(logits)))
    manifest = Calibration(
        temperature=final.temperature,
        scale=final.scale,
        bias=final.bias,
        calibrated=True,
        uncertain_below=round(final_threshold, 4),
    ).to_manifest()
    return {
        "n": len(rows),
        "n_bins": N_BINS,
        "method": method,
        "choice": {
            "rule": f"{only} scaling, as asked (--method)"
            if only
            else f"vector scaling only if its cross-fitted NLL is >= {VECTOR_MIN_NLL_GAIN} "
            "nats lower than temperature scaling's and its cross-fitted ECE is not higher",
            "temperature_crossfitted": {k: t_fig[k] for k in ("nll", "ece", "brier")},
            "vector_crossfitted": {k: v_fig[k] for k in ("nll", "ece", "brier")},
        },
        "before": before,
        "after_crossfitted": after,
        "per_fold_parameters": params,
        "abstain": {
            "target_coverage": COVERAGE,
            "crossfitted_coverage": float(answered.mean()),
            "crossfitted_accuracy_answered": float(correct[answered].mean()),
            "accuracy_all": float(correct.mean()),
            "accuracy_abstained": (
                float(correct[~answered].mean()) if (~answered).any() else float("nan")
            ),
            "coverage_table": coverage_table(probs, labels),
        },
        "manifest": manifest,
        "reliability": {
            "before": _reliability(raw, labels),
            "after_crossfitted": _reliability(probs, labels),
        },
        "_probs": {"before": raw, "after": probs, "labels": labels},
    }


def _reliability(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    onehot = np.eye(probs.shape[1])[labels]
    out = {
        "top_label": reliability_bins(
            probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
        )
    }
    for k, name in enumerate(CLASS_NAMES[: probs.shape[1]]):
        out[name] = reliability_bins(probs[:, k], onehot[:, k])
    return out


# --- report ------------------------------------------------------------------------------------


def plot_reliability(report: dict[str, Any], path: Path) -> Path:
    """Top-label and per-class reliability diagrams, before and after (cross-fitted)."""
    from training.plots import _save, plt

    panels = ["top_label", *CLASS_NAMES]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 4.0))
    for ax, panel in zip(axes, panels, strict=True):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1)
        for key, colour, name in (
            ("before", "tab:red", "uncalibrated"),
            ("after_crossfitted", "tab:blue", f"{report['method']} (cross-fitted)"),
        ):
            bins = report["reliability"][key][panel]
            x = [b["confidence"] for b in bins]
            y = [b["observed"] for b in bins]
            sizes = [8 + 60 * b["n"] / report["n"] for b in bins]
            ax.plot(x, y, color=colour, linewidth=1.2, label=name)
            ax.scatter(x, y, s=sizes, color=colour)
        if panel == "top_label":
            ax.set_title(
                f"top label: ECE {report['before']['ece']:.3f} -> "
                f"{report['after_crossfitted']['ece']:.3f}"
            )
            ax.set_xlabel("confidence (top probability)")
            ax.set_ylabel("observed accuracy")
        else:
            b, a = (
                report["before"]["per_class"][panel],
                report["after_crossfitted"]["per_class"][panel],
            )
            ax.set_title(f"{panel}: ECE {b['ece']:.3f} -> {a['ece']:.3f}")
            ax.set_xlabel(f"p({panel})")
            ax.set_ylabel(f"observed frequency of {panel}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_coverage(report: dict[str, Any], path: Path) -> Path:
    from training.plots import _save, plt

    probs, labels = report["_probs"]["after"], report["_probs"]["labels"]
    order = np.argsort(-probs.max(axis=1), kind="stable")
    correct = (probs.argmax(axis=1) == labels)[order]
    n = np.arange(1, len(labels) + 1)
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    ax.plot(n / len(labels), np.cumsum(correct) / n, color="tab:blue")
    abstain = report["abstain"]
    ax.scatter(
        [abstain["crossfitted_coverage"]], [abstain["crossfitted_accuracy_answered"]],
        color="tab:red", zorder=3, label="cross-fitted threshold",
    )  # fmt: skip
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_xlim(0.4, 1.0)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def render_markdown(report: dict[str, Any], command: str) -> str:
    b, a = report["before"], report["after_crossfitted"]
    lines = [
        "# Calibration and abstain band",
        "",
        f"`{command}`",
        "",
        f"{report['n']} out-of-fold rows; method chosen: **{report['method']}** "
        f"({report['choice']['rule']}). 'After' figures are cross-fitted: each fold calibrated "
        "by parameters fitted on the other folds.",
        "",
        "| | ECE (15 bins) | Brier | NLL | accuracy | mean confidence |",
        "|---|---|---|---|---|---|",
        f"| before | {b['ece']:.4f} | {b['brier']:.4f} | {b['nll']:.4f} | {b['accuracy']:.4f} "
        f"| {b['mean_confidence']:.4f} |",
        f"| after | {a['ece']:.4f} | {a['brier']:.4f} | {a['nll']:.4f} | {a['accuracy']:.4f} "
        f"| {a['mean_confidence']:.4f} |",
        "",
        "| class | classwise ECE before | after | Brier before | after |",
        "|---|---|---|---|---|",
    ]
    for name in b["per_class"]:
        pb, pa = b["per_class"][name], a["per_class"][name]
        lines.append(
            f"| {name} | {pb['ece']:.4f} | {pa['ece']:.4f} "
            f"| {pb['brier']:.4f} | {pa['brier']:.4f} |"
        )
    ab = report["abstain"]
    lines += [
        "",
        "![reliability](reliability.png)",
        "",
        "## Abstain band",
        "",
        f"Threshold on the top calibrated probability set for {ab['target_coverage']:.0%} coverage "
        f"on the fitting folds, applied to the held-out fold: coverage "
        f"{ab['crossfitted_coverage']:.3f}, accuracy on the answered images "
        f"**{ab['crossfitted_accuracy_answered']:.4f}** (all images: {ab['accuracy_all']:.4f}; "
        f"the abstained ones: {ab['accuracy_abstained']:.4f}).",
        "",
        "| coverage | images | accuracy |",
        "|---|---|---|",
        *[
            f"| {r['coverage']:.2f} | {r['n']} | {r['accuracy']:.4f} |"
            for r in ab["coverage_table"]
        ],
        "",
        "![coverage](coverage.png)",
        "",
        "## Manifest fields (fitted on all rows; merge into `output.classes`)",
        "",
        "```json",
        json.dumps(report["manifest"], indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def manifest_fields(path: Path) -> dict[str, Any]:
    """The `output.classes` keys a `calibrate` run wrote to `path` (its manifest.json)."""
    fields = json.loads(Path(path).read_text())
    Calibration.from_manifest(fields, len(CLASS_NAMES))  # raises on anything malformed
    return fields


def main(args: argparse.Namespace) -> dict[str, Any]:
    rows = json.loads(Path(args.oof).read_text())["rows"]
    report = calibrate(rows, None if args.method == "auto" else args.method)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    command = "python -m training calibrate " + " ".join(args.argv)
    plot_reliability(report, output / "reliability.png")
    plot_coverage(report, output / "coverage.png")
    saved = {k: v for k, v in report.items() if not k.startswith("_")}
    (output / "calibration.json").write_text(
        json.dumps({"command": command, **saved}, indent=1) + "\n"
    )
    (output / "manifest.json").write_text(json.dumps(report["manifest"], indent=1) + "\n")
    (output / "report.md").write_text(render_markdown(report, command))
    b, a = report["before"], report["after_crossfitted"]
    log.info(
        "%s: ECE %.4f -> %.4f, Brier %.4f -> %.4f (cross-fitted); accuracy at %.0f%% coverage "
        "%.4f; manifest %s",
        report["method"], b["ece"], a["ece"], b["brier"], a["brier"],
        100 * report["abstain"]["crossfitted_coverage"],
        report["abstain"]["crossfitted_accuracy_answered"], json.dumps(report["manifest"]),
    )  # fmt: skip
    return report


def get_args_parser() -> argparse.ArgumentParser:
    parser = cli.command_parser(
        "calibrate", "Fit calibration + abstain band on out-of-fold logits, report cross-fitted."
    )
    parser.add_argument(
        "--oof", type=Path, required=True, help="oof_logits.json from `oof`; required"
    )
    cli.add_flag(parser, "--output-dir", default=Path("training/reports/calibration"))
    parser.add_argument(
        "--method",
        choices=("auto", "temperature", "vector"),
        default="auto",
        help="auto: vector scaling only when it clearly beats temperature scaling; temperature "
        "keeps every class decision as measured (default: auto)",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    args = get_args_parser().parse_args(argv)
    args.argv = argv
    return args
