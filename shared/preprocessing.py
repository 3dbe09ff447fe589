"""THE preprocessing: one parameterised object used by training, evaluation and the service.

Input is the canonical image from `shared.decoding` (a (H, W) uint8 grayscale array). Output is a
(C, H, W) float32 array ready for a model. The parameters travel in each artifact's metadata and the
service rebuilds this object from them, so a model always sees what it was trained on.

Resizing is done by Pillow on the uint8 image (bilinear, with Pillow's antialiasing) so that
training and serving produce bit-identical tensors from the same bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_RESIZE_MODES = ("shorter_side", "stretch")


@dataclass(frozen=True)
class Preprocessing:
    """Resize, optionally center-crop, scale to [0, 1], normalise, replicate channels.

    resize_mode "shorter_side" scales the shorter side to `resize` keeping the aspect ratio
    (torchvision's Resize(int)); "stretch" scales to `resize` x `resize`, which keeps every pixel
    of the scan in view and so lets a segmentation mask be mapped back onto the whole image.
    """

    resize: int
    resize_mode: str = "shorter_side"
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.crop is not None and self.crop > self.resize:
            raise ValueError("crop must not exceed resize")

    @property
    def output_size(self) -> int:
        """Side of the square tensor handed to the model."""
        return self.crop if self.crop is not None else self.resize

    def resize_image(self, pixels: np.ndarray) -> np.ndarray:
        """Resize (and crop) a (H, W) uint8 image; returns uint8 (S, S)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise ValueError("expected a (H, W) uint8 grayscale image")
        image = Image.fromarray(pixels, mode="L")
        height, width = pixels.shape
        if self.resize_mode == "stretch":
            size = (self.resize, self.resize)
        elif height <= width:
            size = (max(1, round(width * self.resize / height)), self.resize)
        else:
            size = (self.resize, max(1, round(height * self.resize / width)))
        image = image.resize(size, _INTERPOLATIONS[self.interpolation])
        if self.crop is not None:
            left = (image.width - self.crop) // 2
            top = (image.height - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return np.asarray(image, dtype=np.uint8)

    def normalise(self, resized: np.ndarray) -> np.ndarray:
        """uint8 (S, S) -> float32 (C, S, S): scale to [0, 1], replicate, normalise."""
        scaled = resized.astype(np.float32) / 255.0
        stacked = np.repeat(scaled[None], self.channels, axis=0)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return np.ascontiguousarray((stacked - mean) / std, dtype=np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W) uint8 grayscale -> (C, S, S) float32. Raises ValueError on another shape/dtype."""
        return self.normalise(self.resize_image(pixels))

    def to_metadata(self) -> dict[str, Any]:
        """The JSON form stored in an artifact's metadata.json."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        data.pop("extra")
        return data

    @classmethod
    def from_metadata(cls, data: dict[str, Any]) -> Preprocessing:
        """Rebuild from metadata. Raises ValueError on unknown or invalid parameters."""
        known = {"resize", "resize_mode", "crop", "mean", "std", "channels", "interpolation"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        values = dict(data)
        values["mean"] = tuple(float(v) for v in values.get("mean", IMAGENET_MEAN))
        values["std"] = tuple(float(v) for v in values.get("std", IMAGENET_STD))
        return cls(**values)
