"""Helpers for the browser tests of the clinician page: the browser, the service, the scans."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import service_process
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]

# Debian's chromium package; Playwright drives it directly and downloads no browser of its own.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

SCREENSHOT_DIR = REPO_ROOT / "test-artifacts" / "page"


@contextlib.contextmanager
def running_service(env: dict[str, str], log_path: Path, timeout_s: float = 90.0) -> Iterator[str]:
    """Start `python -m service` on a free loopback port; yield its base URL once /readyz is 200."""
    with service_process.running_service(env, log_path, timeout_s=timeout_s) as service:
        yield service.url


# ---- scans made in the test -------------------------------------------------------------------


def synthetic_scan(
    width: int = 320, height: int = 256, shift: int = 0, seed: int = 0
) -> np.ndarray:
    """An ultrasound-like 8-bit frame: speckled tissue with one dark oval mass."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    tissue = 110 + 40 * np.sin(yy / 17.0) + rng.normal(0, 22, (height, width))
    cx, cy = width * 0.45 + shift, height * 0.5
    mass = ((xx - cx) / (width * 0.18)) ** 2 + ((yy - cy) / (height * 0.14)) ** 2 <= 1.0
    tissue[mass] = 25 + rng.normal(0, 6, int(mass.sum()))
    return np.clip(tissue, 0, 255).astype(np.uint8)


def scan_png_bytes(**kwargs: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_scan(**kwargs)).save(buf, format="PNG")
    return buf.getvalue()


def multiframe_dicom_bytes(n_frames: int = 3, width: int = 320, height: int = 256) -> bytes:
    """An uncompressed MONOCHROME2 ultrasound cine (US Multi-frame), the mass moving per frame."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image Storage
    frames = np.stack(
        [synthetic_scan(width, height, shift=12 * i, seed=i) for i in range(n_frames)]
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "TEST-0001"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = height, width
    ds.NumberOfFrames = n_frames
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = frames.tobytes()

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# ---- a registry whose models make every part of the page appear -------------------------------

# The page tests need a finding that is a lesion and a mask that outlines it, whatever random
# weights would say. So these two tiny TorchScript models are rigged, not trained: the segmenter
# marks dark, smooth regions (the oval mass of `synthetic_scan`) as lesion, and the classifier
# calls an image "malignant" when enough of it is such a region, else "normal". They go through
# the real artifact format and the real service like any published model.
RIGGED_SIDE = 64


def publish_rigged_models(model_dir: Path) -> None:
    """Publish the rigged classification and segmentation models into `model_dir`."""
    import torch
    import torch.nn.functional as F

    from shared.labels import CLASS_NAMES, TASK_CLASSIFICATION, TASK_SEGMENTATION
    from shared.preprocessing import Preprocessing
    from shared.promotion import GateFloors, promote
    from shared.store import publish_artifact

    class DarkRegions(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            smooth = F.avg_pool2d(x[:, :1], 7, stride=1, padding=3, count_include_pad=False)
            # Lesion where the smoothed, normalised intensity is below -1.1 (about 53 of 255).
            return 8.0 * (-1.1 - smooth)  # (N, 1, S, S) logits

    class LesionIfDark(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.regions = DarkRegions()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dark = torch.sigmoid(self.regions(x)).mean(dim=[1, 2, 3])
            normal = 1.0 - 30.0 * dark
            benign = torch.full_like(dark, 0.5)
            malignant = 30.0 * dark - 0.5
            return torch.stack([normal, benign, malignant], dim=1)  # CLASS_NAMES order

    assert CLASS_NAMES == ("normal", "benign", "malignant")
    pre = Preprocessing(resize=RIGGED_SIDE, resize_mode="stretch").to_metadata()
    spec_in = {"channels": 3, "height": RIGGED_SIDE, "width": RIGGED_SIDE}
    models = {
        TASK_CLASSIFICATION: (
            LesionIfDark(),
            {"output": {"shape": [3], "type": "logits"}, "class_names": list(CLASS_NAMES)},
        ),
        TASK_SEGMENTATION: (
            DarkRegions(),
            {
                "output": {
                    "shape": [1, RIGGED_SIDE, RIGGED_SIDE],
                    "type": "logits",
                    "threshold": 0.5,
                }
            },
        ),
    }
    for task, (module, extra) in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit.script's deprecation notice
            scripted = torch.jit.script(module.eval())
        model_file = model_dir / f"{task}-rigged.pt"
        model_dir.mkdir(parents=True, exist_ok=True)
        scripted.save(str(model_file))
        metadata = {
            "name": f"page-test-{task}",
            "preprocessing": pre,
            "input": spec_in,
            "intended_use": "browser tests of the clinician page only",
            # passes the promotion gate; the rigged models earn it on the page's rigged scans
            "metrics": {"test": {"accuracy": 0.9, "lesion_dice": 0.9, "n": 100}},
            **extra,
        }
        publish_artifact(model_dir, task, "rigged-1", model_file, metadata)
        promote(model_dir, task, "rigged-1", GateFloors())
        model_file.unlink()
