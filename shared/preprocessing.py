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
_RESIZE_MODES = ("shorter_side", "stretch", "letterbox")
# trim_border: a border row or column is "dark" when fewer than this fraction of its pixels are
# brighter than _DARK_LEVEL (the black margins scanners and PACS put around the sector).
_DARK_LEVEL = 16
_DARK_FRACTION = 0.01


@dataclass(frozen=True)
class Layout:
    """Where a frame's pixels went in the model's S x S input (and so how a map comes back).

    `crop` is (top, left, height, width) of the part of the frame that was kept (the whole frame
    unless dark borders were trimmed); that part was resized to `resized` (height, width) and
    placed at `offset` (top, left) of the S x S input, the rest being zero-valued padding.
    """

    frame: tuple[int, int]
    crop: tuple[int, int, int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]


def content_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, height, width) of `pixels` without its dark border rows and columns.

    A row or column is dark when fewer than 1% of its pixels exceed grey level 16. A frame that
    is dark all over (blank) is kept whole.
    """
    bright = pixels > _DARK_LEVEL
    rows = np.flatnonzero(bright.mean(axis=1) >= _DARK_FRACTION)
    cols = np.flatnonzero(bright.mean(axis=0) >= _DARK_FRACTION)
    if rows.size == 0 or cols.size == 0:
        return 0, 0, int(pixels.shape[0]), int(pixels.shape[1])
    top, left = int(rows[0]), int(cols[0])
    return top, left, int(rows[-1]) - top + 1, int(cols[-1]) - left + 1


@dataclass(frozen=True)
class Preprocessing:
    """Resize, optionally center-crop, scale to [0, 1], normalise, replicate channels.

    resize_mode "shorter_side" scales the shorter side to `resize` keeping the aspect ratio
    (torchvision's Resize(int)); "stretch" scales to `resize` x `resize`, which keeps every pixel
    of the scan in view and so lets a segmentation mask be mapped back onto the whole image;
    "letterbox" scales the longer side to `resize` keeping the aspect ratio and pads the shorter
    one equally on both sides with black (grey level 0), so a 640x480 frame and a square one show
    a lesion with the same shape. `trim_border` first drops the frame's dark border rows and
    columns (see `content_box`), so black margins around the sector do not shrink the scan.
    `layout` and `frame_map` map a model-sized map back onto the frame for every mode.
    """

    resize: int
    resize_mode: str = "shorter_side"
    crop: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "bilinear"
    trim_border: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(
                f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}"
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(_INTERPOLATIONS)}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.crop is not None and self.crop > self.resize:
            raise ValueError("crop must not exceed resize")
        if self.resize_mode == "letterbox" and self.crop is not None:
            raise ValueError("letterbox takes no crop")

    @property
    def output_size(self) -> int:
        """Side of the square tensor handed to the model."""
        return self.crop if self.crop is not None else self.resize

    def layout(self, pixels: np.ndarray) -> Layout:
        """Where the frame `pixels` ((H, W) uint8) lands in the model input."""
        height, width = pixels.shape
        if self.trim_border:
            top, left, ch, cw = content_box(pixels)
        else:
            top, left, ch, cw = 0, 0, height, width
        if self.resize_mode == "stretch":
            rh, rw = self.resize, self.resize
        elif self.resize_mode == "letterbox":
            scale = self.resize / max(ch, cw)
            rh = min(self.resize, max(1, round(ch * scale)))
            rw = min(self.resize, max(1, round(cw * scale)))
        elif ch <= cw:
            rh, rw = self.resize, max(1, round(cw * self.resize / ch))
        else:
            rh, rw = max(1, round(ch * self.resize / cw)), self.resize
        side = self.output_size
        if self.resize_mode == "letterbox":
            oy, ox = (side - rh) // 2, (side - rw) // 2  # padding: offset is positive
        elif self.crop is None:
            oy, ox = 0, 0  # shorter_side without a crop: the output is the resized image
        else:
            oy, ox = -((rh - side) // 2), -((rw - side) // 2)  # centre crop: offset <= 0
        return Layout((height, width), (top, left, ch, cw), (rh, rw), (oy, ox))

    def resize_image(self, pixels: np.ndarray, layout: Layout | None = None) -> np.ndarray:
        """Resize (and crop or pad) a (H, W) uint8 image; returns uint8 (S, S)."""
        if pixels.dtype != np.uint8 or pixels.ndim != 2:
            raise ValueError("expected a (H, W) uint8 grayscale image")
        layout = layout or self.layout(pixels)
        top, left, ch, cw = layout.crop
        rh, rw = layout.resized
        if (top, left, ch, cw) != (0, 0, *pixels.shape):
            pixels = pixels[top : top + ch, left : left + cw]
        image = Image.fromarray(np.ascontiguousarray(pixels), mode="L")
        image = image.resize((rw, rh), _INTERPOLATIONS[self.interpolation])
        side = self.output_size
        oy, ox = layout.offset
        if self.resize_mode == "letterbox":
            canvas = np.zeros((side, side), dtype=np.uint8)
            canvas[oy : oy + rh, ox : ox + rw] = np.asarray(image, dtype=np.uint8)
            return canvas
        if self.crop is not None and (rh, rw) != (side, side):
            image = image.crop((-ox, -oy, -ox + side, -oy + side))
        return np.asarray(image, dtype=np.uint8)

    def frame_map(self, values: np.ndarray, layout: Layout) -> np.ndarray:
        """A model-sized (S, S) float map -> the frame's (H, W) float32 map (bilinear).

        Inverse of `resize_image`: the padding is dropped, the kept part is resized back to the
        crop's size and placed where it came from; frame pixels the model never saw (trimmed
        borders, a centre crop's sides) get 0.
        """
        height, width = layout.frame
        top, left, ch, cw = layout.crop
        rh, rw = layout.resized
        oy, ox = layout.offset
        side_h, side_w = values.shape[-2:]
        full = np.zeros((rh, rw), dtype=np.float32)
        # the part of the resized crop that is inside the model input
        y0, x0 = max(0, -oy), max(0, -ox)
        y1, x1 = min(rh, side_h - oy), min(rw, side_w - ox)
        full[y0:y1, x0:x1] = values[y0 + oy : y1 + oy, x0 + ox : x1 + ox]
        back = Image.fromarray(full, mode="F").resize((cw, ch), Image.Resampling.BILINEAR)
        out = np.zeros((height, width), dtype=np.float32)
        out[top : top + ch, left : left + cw] = np.asarray(back)
        return out

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
        known = {
            "resize",
            "resize_mode",
            "crop",
            "mean",
            "std",
            "channels",
            "interpolation",
            "trim_border",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        values = dict(data)
        values["mean"] = tuple(float(v) for v in values.get("mean", IMAGENET_MEAN))
        values["std"] = tuple(float(v) for v in values.get("std", IMAGENET_STD))
        return cls(**values)
