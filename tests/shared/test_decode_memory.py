"""Peak memory of the worst inputs the caps let through, measured in a fresh subprocess.

Each case runs in its own interpreter: its bytes are written to a file first, the child reads
them, notes its resident size, decodes, preprocesses (224 px, shorter side, as a classifier
does) and maps a model-sized map back to the frame and encodes the mask PNG (as /segment does),
then reports its peak resident size (VmHWM: ru_maxrss would carry the forking parent's peak
across exec). What is asserted is the peak minus the resident
size before decoding: what one request costs on top of the service.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, FileMetaDataset, dcmwrite
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, UltrasoundImageStorage, generate_uid

from shared.decoding import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
)

REPO = Path(__file__).resolve().parents[2]
# The stated bound: one request's decoding and pre/post-processing, on top of the service.
PEAK_BOUND_MIB = 640  # measured worst: ~530 MiB, most of it the frame-sized float32 map of /segment

CHILD = r"""
import json, sys
import numpy as np
from shared.decoding import decode_image
from shared.errors import InputError
from shared.preprocessing import Preprocessing
from PIL import Image
import io

data = open(sys.argv[1], "rb").read()
def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
before = status_kib("VmRSS")
outcome = "decoded"
try:
    image = decode_image(data)
    pre = Preprocessing(resize=224)
    layout = pre.layout(image.pixels)
    batch = pre.normalise(pre.resize_image(image.pixels, layout))
    side = pre.output_size
    frame = pre.frame_map(np.zeros((side, side), np.float32), layout)
    mask = np.where(frame > 0.5, np.uint8(255), np.uint8(0))  # as service/predictors.py
    del frame
    Image.fromarray(mask, mode="L").save(io.BytesIO(), format="PNG", compress_level=3)
except InputError as exc:
    outcome = exc.code
peak = status_kib("VmHWM")
print(json.dumps({"outcome": outcome, "extra_mib": (peak - before) / 1024}))
"""


def _png(width: int, height: int, colour_type: int = 0, channels: int = 1) -> bytes:
    """A real, fully decodable all-black PNG, compressed row by row (a few KB for 40 M pixels)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (width * channels + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _rle_frame(rows: int, cols: int, segment_bytes: list[int]) -> bytes:
    """One RLE frame (PS3.5 G) whose every segment repeats one byte: built without the pixels.

    Each row is encoded on its own as replicate runs of 128 (header byte 0x81) and a remainder.
    """
    full, rest = divmod(cols, 128)
    segments = []
    for value in segment_bytes:
        tail = bytes([257 - rest, value]) if rest >= 2 else bytes([0, value]) * rest
        segments.append((bytes([0x81, value]) * full + tail) * rows)
    offsets, position = [], 64
    for segment in segments:
        offsets.append(position)
        position += len(segment)
    header = struct.pack("<16L", len(segments), *offsets, *[0] * (15 - len(segments)))
    return header + b"".join(segments)


def _rle_dicom(rows: int, cols: int, samples: int, bits: int, **elements) -> bytes:
    """An RLE Lossless DICOM of constant pixels (the last value of each sample is 0x0FA0)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Modality = "US"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples == 3:
        ds.PlanarConfiguration = 0
    per_sample = [0x0F, 0xA0] if bits == 16 else [0x80]
    ds.PixelData = encapsulate([_rle_frame(rows, cols, per_sample * samples)])
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _cases() -> dict[str, tuple[bytes, str]]:
    side = int(DEFAULT_MAX_PIXELS**0.5)  # 6324: the largest square frame the pixel cap allows
    rgb_side = int((DEFAULT_MAX_DECODED_BYTES / 4) ** 0.5)  # Pillow holds RGB as 4 bytes/pixel
    long_side = int((DEFAULT_MAX_PIXELS * DEFAULT_MAX_ASPECT_RATIO) ** 0.5)  # 20000 x 2000
    return {
        # the reproducers: refused from the header now
        "png 8 x 1,000,000 (issue)": (_png(8, 1_000_000), "image_too_large"),
        "png 8 x 5,000,000 (issue)": (_png(8, 5_000_000), "image_too_large"),
        "rle dicom 6324^2 x 3 x 16 bit (issue)": (_rle_dicom(side, side, 3, 16), "image_too_large"),
        # the largest inputs the default caps let through
        f"png gray {side}^2": (_png(side, side), "decoded"),
        f"png rgb {rgb_side}^2": (_png(rgb_side, rgb_side, 2, 3), "decoded"),
        f"rle dicom 16-bit {side}^2, rescale + window": (
            _rle_dicom(
                side,
                side,
                1,
                16,
                RescaleSlope="2",
                RescaleIntercept="-1024",
                WindowCenter="3000",
                WindowWidth="6000",
            ),
            "decoded",
        ),  # fmt: skip
        f"rle dicom rgb 8-bit {rgb_side}^2": (_rle_dicom(rgb_side, rgb_side, 3, 8), "decoded"),
        f"png {long_side} x {long_side // 10} (the aspect cap)": (
            _png(long_side, long_side // 10),
            "decoded",
        ),
    }


@pytest.mark.slow
def test_worst_case_inputs_stay_under_the_peak_memory_bound(tmp_path):
    results = {}
    for name, (data, expected) in _cases().items():
        path = tmp_path / "input.bin"
        path.write_bytes(data)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert child.returncode == 0, child.stderr[-2000:]
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results[name] = (len(data), result["outcome"], round(result["extra_mib"]))
        assert result["outcome"] == expected, (name, result)
    print("\n".join(f"{n}: {b} bytes -> {o}, +{m} MiB peak" for n, (b, o, m) in results.items()))
    worst = max(m for _, _, m in results.values())
    assert worst < PEAK_BOUND_MIB, results
