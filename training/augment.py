"""Appearance and site augmentation: what changes between scanners, presets and hospitals.

Applied to the uint8 frame before THE preprocessing, on training images only. Each transform
changes how a scan looks without changing what it shows, so a model cannot tell sites apart by
gain, speckle, sharpness, resolution, compression or the marks a sonographer leaves:

- gain and gamma (preset brightness and dynamic range),
- multiplicative speckle-like noise, smoothed to a few pixels (transducer frequency),
- Gaussian blur and down-and-up resampling (resolution, the archive's scaling),
- JPEG re-encoding (lossy archives and screen captures),
- synthetic calliper crosses and burned-in text (annotations on the frame).

`lesion_free_band` cuts, from a lesion scan, the largest band of tissue away from the lesion:
extra "normal" tissue from a site that has no normal scans (training.sites), so "this site, so
a lesion" is not a shortcut the model can learn.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Appearance:
    """Probabilities and ranges of each appearance transform (all off at p=0)."""

    p: float = 0.8  # probability that any appearance change is applied to an image
    gamma: tuple[float, float] = (0.6, 1.6)
    gain: tuple[float, float] = (0.7, 1.3)
    speckle_p: float = 0.4
    speckle_sigma: tuple[float, float] = (0.05, 0.25)
    blur_p: float = 0.3
    blur_radius: tuple[float, float] = (0.4, 1.6)
    resample_p: float = 0.3
    resample_factor: tuple[float, float] = (0.35, 0.8)
    jpeg_p: float = 0.3
    jpeg_quality: tuple[int, int] = (25, 90)
    marks_p: float = 0.3


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    return rng.uniform(bounds[0], bounds[1])


def gain_gamma(image: np.ndarray, gain: float, gamma: float) -> np.ndarray:
    x = (image.astype(np.float32) / 255.0) ** gamma * gain
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def speckle(image: np.ndarray, sigma: float, rng: random.Random) -> np.ndarray:
    """Multiplicative noise with a grain of about two pixels (speckle is not white noise)."""
    height, width = image.shape
    gen = np.random.default_rng(rng.getrandbits(32))
    small = gen.standard_normal((max(2, height // 2), max(2, width // 2))).astype(np.float32)
    field = np.asarray(
        Image.fromarray(small, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )
    out = image.astype(np.float32) * (1.0 + sigma * field)
    return np.clip(out, 0, 255).astype(np.uint8)


def blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def down_up(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape
    small = (max(8, round(width * factor)), max(8, round(height * factor)))
    im = Image.fromarray(image).resize(small, Image.Resampling.BILINEAR)
    return np.asarray(im.resize((width, height), Image.Resampling.BILINEAR))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("L"))


def marks(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """One to four calliper crosses and sometimes a block of burned-in text, in bright grey."""
    out = image.copy()
    height, width = out.shape
    arm = max(2, min(height, width) // 40)
    level = rng.randrange(180, 256)
    for _ in range(rng.randint(1, 4)):
        y, x = rng.randrange(height), rng.randrange(width)
        out[max(0, y - arm) : y + arm + 1, x] = level
        out[y, max(0, x - arm) : x + arm + 1] = level
    if rng.random() < 0.5:
        h, w = max(2, height // 30), max(4, width // rng.randint(5, 12))
        top, left = rng.randrange(max(1, height - h)), rng.randrange(max(1, width - w))
        bits = [[rng.random() < 0.5 for _ in range(w)] for _ in range(h)]
        out[top : top + h, left : left + w] = np.where(np.asarray(bits), level, 0).astype(np.uint8)
    return out


def appearance(image: np.ndarray, params: Appearance, rng: random.Random) -> np.ndarray:
    """`image` with a random draw of the transforms of `params` (the mask is unchanged)."""
    if params.p <= 0 or rng.random() >= params.p:
        return image
    image = gain_gamma(image, _uniform(rng, params.gain), _uniform(rng, params.gamma))
    if rng.random() < params.speckle_p:
        image = speckle(image, _uniform(rng, params.speckle_sigma), rng)
    if rng.random() < params.blur_p:
        image = blur(image, _uniform(rng, params.blur_radius))
    if rng.random() < params.resample_p:
        image = down_up(image, _uniform(rng, params.resample_factor))
    if rng.random() < params.jpeg_p:
        image = jpeg(image, rng.randint(*params.jpeg_quality))
    if rng.random() < params.marks_p:
        image = marks(image, rng)
    return np.ascontiguousarray(image)


def lesion_free_band(
    image: np.ndarray, mask: np.ndarray, min_fraction: float = 0.35, margin: float = 0.05
) -> np.ndarray | None:
    """The largest full-width or full-height band of `image` that stays `margin` (a fraction of
    the side) away from every lesion pixel of `mask`, if it covers at least `min_fraction` of
    that side; None when the lesion leaves no such band (or there is no lesion to avoid)."""
    lesion = mask > 127
    if not lesion.any():
        return None
    height, width = image.shape
    rows, cols = np.flatnonzero(lesion.any(axis=1)), np.flatnonzero(lesion.any(axis=0))
    my, mx = round(margin * height), round(margin * width)
    bands = [
        (rows[0] - my, image[: max(0, rows[0] - my)], height),  # above the lesion
        (height - rows[-1] - 1 - my, image[rows[-1] + 1 + my :], height),  # below
        (cols[0] - mx, image[:, : max(0, cols[0] - mx)], width),  # left
        (width - cols[-1] - 1 - mx, image[:, cols[-1] + 1 + mx :], width),  # right
    ]
    size, band, side = max(bands, key=lambda b: b[0] / b[2])
    if size < min_fraction * side or min(band.shape) < 8:
        return None
    return np.ascontiguousarray(band)


def zoom_crop(
    image: np.ndarray,
    mask: np.ndarray,
    rng: random.Random,
    scale: tuple[float, float] = (0.45, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """A random window of `image` and `mask`, each side `scale` of the frame's, that keeps the
    whole lesion: the field of view of another scanner preset or a sonographer's zoom (one
    site's lesions fill the frame, another's are a speck in deep tissue). The window grows to
    the lesion's bounding box when the lesion is larger; a scan without a lesion is cropped
    anywhere."""
    height, width = image.shape
    win_h = max(8, round(height * _uniform(rng, scale)))
    win_w = max(8, round(width * _uniform(rng, scale)))
    lesion = mask > 127
    if lesion.any():
        rows, cols = np.flatnonzero(lesion.any(axis=1)), np.flatnonzero(lesion.any(axis=0))
        win_h = max(win_h, int(rows[-1] - rows[0] + 1))
        win_w = max(win_w, int(cols[-1] - cols[0] + 1))
        top_range = (max(0, int(rows[-1]) + 1 - win_h), min(int(rows[0]), height - win_h))
        left_range = (max(0, int(cols[-1]) + 1 - win_w), min(int(cols[0]), width - win_w))
    else:
        top_range, left_range = (0, height - win_h), (0, width - win_w)
    top = rng.randint(top_range[0], max(top_range[0], top_range[1]))
    left = rng.randint(left_range[0], max(left_range[0], left_range[1]))
    window = (slice(top, top + win_h), slice(left, left + win_w))
    return np.ascontiguousarray(image[window]), np.ascontiguousarray(mask[window])
