"""Training augmentation of every task, on the uint8 frame (and its mask) before THE
preprocessing, on training images only.

- `augment_pair`: flip, rotation, scale, shift and brightness / contrast of an image and its mask
  together (the segmentation and joint recipes);
- `augment_geometry`: aspect stretch and black margins with burned-in text, as non-square
  scanner frames bring them (the joint recipes);
- `Augmentation`: the classification recipes' torchvision transforms ("seed", "strong", "none");
- `zoom_crop`: a zoomed-in window that keeps the lesion whole;
- appearance and site augmentation: what changes between scanners, presets and hospitals.

Each appearance transform changes how a scan looks without changing what it shows, so a model
cannot tell sites apart by gain, speckle, sharpness, resolution, compression or the marks a
sonographer leaves:

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
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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


# --- geometry: flips, affine, aspect, margins ---------------------------------------------------


def augment_pair(
    image: np.ndarray, mask: np.ndarray, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Random flip, rotation (+-10 deg), scale (0.85-1.15), shift (+-6%) applied identically to a
    uint8 image and its mask, then brightness/contrast on the image. Train only, before
    THE preprocessing, on the full-size uint8 arrays the service would also start from."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    height, width = image.shape
    if rng.random() < 0.8:
        angle = math.radians(rng.uniform(-10.0, 10.0))
        scale = rng.uniform(0.85, 1.15)
        tx, ty = rng.uniform(-0.06, 0.06) * width, rng.uniform(-0.06, 0.06) * height
        cx, cy = width / 2.0, height / 2.0
        # PIL wants the inverse map (output pixel -> input pixel) of
        # out = scale * R(angle) (in - c) + c + t
        a, b = math.cos(angle) / scale, math.sin(angle) / scale
        d, e = -math.sin(angle) / scale, math.cos(angle) / scale
        c = cx - a * (cx + tx) - b * (cy + ty)
        f = cy - d * (cx + tx) - e * (cy + ty)
        coeffs = (a, b, c, d, e, f)
        image = np.asarray(
            Image.fromarray(np.ascontiguousarray(image)).transform(
                (width, height), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR
            )
        )
        mask = np.asarray(
            Image.fromarray(np.ascontiguousarray(mask)).transform(
                (width, height), Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST
            )
        )
    if rng.random() < 0.8:
        contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-20.0, 20.0)
        mean = float(image.mean())
        image = np.clip((image.astype(np.float32) - mean) * contrast + mean + brightness, 0, 255)
    return np.ascontiguousarray(image, dtype=np.uint8), np.ascontiguousarray(mask)


def burn_in_label(canvas: np.ndarray, top: int, left: int, rng: random.Random) -> None:
    """Draw a block of bright "text" (like a scanner's burned-in annotation) in place."""
    height, width = canvas.shape
    h, w = max(2, height // 32), max(4, width // 10)
    top, left = min(top, height - h), min(left, width - w)
    block = np.asarray([[200 if rng.random() < 0.5 else 0 for _ in range(w)] for _ in range(h)])
    canvas[top : top + h, left : left + w] = block.astype(np.uint8)


def augment_geometry(
    image: np.ndarray, mask: np.ndarray, preset: Any, rng: random.Random
) -> tuple[np.ndarray, np.ndarray]:
    """Aspect stretch and black margins, as non-square scanner frames bring them."""
    if rng.random() < preset.aspect_p:
        height, width = image.shape
        factor = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
        size = (max(8, round(width * factor)), height)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    if rng.random() < preset.margin_p:
        height, width = image.shape
        pad = [round(rng.uniform(0, 0.3) * side) for side in (height, height, width, width)]
        canvas_i = np.zeros((height + pad[0] + pad[1], width + pad[2] + pad[3]), np.uint8)
        canvas_m = np.zeros_like(canvas_i)
        if rng.random() < 0.5 and min(pad) > 0:
            burn_in_label(canvas_i, rng.randrange(pad[0]), rng.randrange(pad[2]), rng)
        canvas_i[pad[0] : pad[0] + height, pad[2] : pad[2] + width] = image
        canvas_m[pad[0] : pad[0] + height, pad[2] : pad[2] + width] = mask
        image, mask = canvas_i, canvas_m
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# --- the classification recipes' torchvision transforms ----------------------------------------


class Augmentation:
    """Random transforms of a (H, W) uint8 image and, jointly, of its (H, W) uint8 mask.

    Works on uint8 so that what follows is THE preprocessing, unchanged. Randomness comes from
    torch's global generator, seeded by engine.seed_everything.
    """

    def __init__(self, kind: str, size: int) -> None:
        from torchvision.transforms import v2

        if kind == "seed":
            ops = [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), v2.RandomRotation(10)]
        elif kind == "strong":
            # Horizontal flips only: the skin line is always at the top of an ultrasound frame.
            ops = [
                v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomRotation(10),
                v2.ColorJitter(brightness=0.25, contrast=0.25),
            ]
        elif kind == "none":
            ops = []
        else:
            raise ValueError(f"unknown augmentation {kind!r}; valid: seed, strong, none")
        self.kind = kind
        self.transform = v2.Compose(ops)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        from torchvision import tv_tensors

        img = tv_tensors.Image(torch.from_numpy(image)[None])
        if mask is None:
            return self.transform(img)[0].numpy(), None
        out_img, out_mask = self.transform(img, tv_tensors.Mask(torch.from_numpy(mask)[None]))
        return out_img[0].numpy(), out_mask[0].numpy()
