"""Letterbox geometry: aspect kept, dark borders trimmed, maps brought back onto the frame."""

from __future__ import annotations

import numpy as np
import pytest

from shared.preprocessing import Preprocessing, content_box


def scan(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(40, 220, size=(height, width), dtype=np.uint8)


def test_letterbox_keeps_the_aspect_ratio_and_pads_with_black():
    pre = Preprocessing(resize=64, resize_mode="letterbox")
    out = pre.resize_image(scan(30, 60))
    assert out.shape == (64, 64)
    layout = pre.layout(scan(30, 60))
    assert layout.resized == (32, 64) and layout.offset == (16, 0)
    assert not out[:16].any() and not out[48:].any()  # the padding
    assert out[16:48].min() > 0  # the scan itself


def test_trim_border_drops_black_margins_so_a_canvas_looks_like_the_scan():
    pre = Preprocessing(resize=64, resize_mode="letterbox", trim_border=True)
    image = scan(48, 48)
    canvas = np.zeros((48, 100), dtype=np.uint8)
    canvas[:, 26:74] = image
    assert content_box(canvas) == (0, 26, 48, 48)
    assert np.array_equal(pre.resize_image(canvas), pre.resize_image(image))


def test_a_blank_frame_is_kept_whole():
    assert content_box(np.zeros((10, 20), dtype=np.uint8)) == (0, 0, 10, 20)


@pytest.mark.parametrize(
    "pre",
    [
        Preprocessing(resize=64, resize_mode="letterbox", trim_border=True),
        Preprocessing(resize=64, resize_mode="letterbox"),
        Preprocessing(resize=64, resize_mode="stretch"),
        Preprocessing(resize=72, crop=64),
    ],
    ids=["letterbox-trim", "letterbox", "stretch", "centre-crop"],
)
def test_frame_map_puts_a_mask_back_where_it_came_from(pre):
    """A lesion drawn on the frame, sent through resize_image and back with frame_map, lands on
    itself (Dice near 1) for every geometry; the trimmed margins get nothing."""
    height, width = 90, 160
    frame = np.zeros((height, width), dtype=np.uint8)
    frame[:, 20:140] = scan(height, 120)  # black side margins for the trim to find
    lesion = np.zeros((height, width), dtype=np.uint8)
    lesion[30:60, 60:100] = 255
    layout = pre.layout(frame)
    model_mask = pre.resize_image(lesion, layout).astype(np.float32) / 255.0
    back = pre.frame_map(model_mask, layout) > 0.5
    truth = lesion > 0
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert back.shape == (height, width)
    assert dice > 0.9
    if pre.trim_border:
        assert not back[:, :20].any() and not back[:, 140:].any()


def test_letterbox_round_trips_through_the_manifest():
    pre = Preprocessing(resize=224, resize_mode="letterbox", trim_border=True)
    assert Preprocessing.from_metadata(pre.to_metadata()) == pre
    with pytest.raises(ValueError):
        Preprocessing(resize=224, resize_mode="letterbox", crop=200)
