"""PNG figures of a segmentation run: loss curves, IoU against threshold, sample overlays."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from training import plots  # noqa: E402
from training.engine import History  # noqa: E402


def plot_loss_curves(history: History, path: Path) -> None:
    """Train and val loss per epoch, with the val Dice columns (threshold 0.5) on a second axis."""
    plots.plot_loss_curves(history, path, extra=("val_lesion_dice", "val_all_dice"))


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
