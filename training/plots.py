"""PNG figures for the run reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training.engine import History  # noqa: E402
from training.metrics import roc_auc, roc_curve  # noqa: E402


def _save(fig: plt.Figure, path: Path, dpi: int = 110) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Counts with row-normalised shading; rows are true classes, columns predictions."""
    m = np.asarray(matrix, dtype=float)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="white" if norm[i, j] > 0.6 else "black",
            )
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return _save(fig, path)


def plot_roc_curves(
    y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """One-vs-rest ROC curve per class with its AUC."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    for c, name in enumerate(class_names):
        positive = np.asarray(y_true) == c
        fpr, tpr = roc_curve(probs[:, c], positive)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(probs[:, c], positive):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title(title or "ROC, one vs rest")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_loss_curves(history: History, path: Path, extra: Sequence[str] = ()) -> Path:
    """Train and val loss per epoch; `extra` history columns on a second axis."""
    epochs = history.column("epoch")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(epochs, history.column("train_loss"), label="train loss")
    ax.plot(epochs, history.column("val_loss"), label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    lines, labels = ax.get_legend_handles_labels()
    if extra:
        ax2 = ax.twinx()
        for name in extra:
            ax2.plot(epochs, history.column(name), linestyle="--", label=name)
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        lines, labels = lines + more[0], labels + more[1]
    ax.legend(lines, labels, fontsize=8, loc="center right")
    return _save(fig, path)


def plot_prediction_grid(
    images: Sequence[np.ndarray],
    true_labels: Sequence[str],
    predictions: Sequence[str],
    confidences: Sequence[float],
    path: Path,
    columns: int = 4,
    masks: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Grayscale images titled `true -> predicted (p)`, red when wrong; optional mask outlines."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.5 * rows))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        if masks is not None and masks[i] is not None and np.any(masks[i]):
            ax.contour(masks[i] > 0, levels=[0.5], colors="yellow", linewidths=0.8)
        wrong = true_labels[i] != predictions[i]
        ax.set_title(
            f"{true_labels[i]} -> {predictions[i]} ({confidences[i]:.2f})",
            fontsize=8,
            color="red" if wrong else "black",
        )
    return _save(fig, path, dpi=72)  # photographs compress badly: keep the committed PNG small


def plot_iou_vs_threshold(
    sweeps: dict[str, list[dict[str, float]]], chosen: float, path: Path
) -> None:
    """Mean lesion IoU and the share of normal images with a lesion against the threshold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, sweep in sweeps.items():
        t = [row["threshold"] for row in sweep]
        ax.plot(t, [row["lesion_iou"] for row in sweep], marker=".", label=f"{name}: lesion IoU")
        fp = [row["normal_with_lesion"] for row in sweep]
        if not all(np.isnan(fp)):
            ax.plot(t, fp, linestyle="--", label=f"{name}: normals given a lesion")
    ax.axvline(chosen, color="grey", linewidth=1, label=f"chosen threshold {chosen:.2f}")
    ax.set_xlabel("threshold on the lesion probability")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("IoU against threshold")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sample_predictions(
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    titles: Sequence[str],
    path: Path,
    columns: int = 4,
) -> None:
    """Each image in grey with the true outline in green and the predicted mask in red."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, truth, pred, title in zip(
        axes.flat, images, truths, predictions, titles, strict=False
    ):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        overlay = np.zeros((*pred.shape, 4), dtype=np.float32)
        overlay[pred > 0] = (1.0, 0.1, 0.1, 0.35)
        ax.imshow(overlay)
        if truth.any():
            ax.contour(truth > 0, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(title, fontsize=8)
    fig.suptitle("test samples: truth outline green, prediction red", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72)  # committed with the reports: keep the file small
    plt.close(fig)
