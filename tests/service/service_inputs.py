"""Synthetic images for the service tests, made in the test (no patient data anywhere).

A "scan" is a grey background (100) with one bright rectangle (230): the tiny classifier of
tests/conftest.py calls it benign and the tiny segmenter outlines the rectangle.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ULTRASOUND_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_TEXT_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"

# The lesion rectangle of scan(): x, y, width, height
LESION = (30, 20, 40, 30)


def scan(width: int = 96, height: int = 80, background: int = 100, lesion: int = 230) -> np.ndarray:
    pixels = np.full((height, width), background, dtype=np.uint8)
    x, y, w, h = LESION
    pixels[y : y + h, x : x + w] = lesion
    return pixels


def uniform(value: int, width: int = 64, height: int = 64) -> np.ndarray:
    return np.full((height, width), value, dtype=np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png(pixels: np.ndarray | None = None) -> bytes:
    return encode(scan() if pixels is None else pixels, "PNG")


def jpeg(pixels: np.ndarray | None = None) -> bytes:
    return encode(scan() if pixels is None else pixels, "JPEG", quality=95)


def png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb: a small PNG whose header declares width x height grey pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # the first rows; all zeros compress well
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def dicom(
    frames: list[np.ndarray] | np.ndarray | None = None, *, with_pixels: bool = True
) -> bytes:
    """An ultrasound DICOM file (8-bit MONOCHROME2, one frame or several), or a text SR."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-TAG-VALUE-42"
    if not with_pixels:
        ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.Modality = "SR"
    else:
        ds.SOPClassUID = ULTRASOUND_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.Modality = "US"
        stack = (
            np.stack(frames) if isinstance(frames, list) else (scan() if frames is None else frames)
        )
        if stack.ndim == 3:
            ds.NumberOfFrames = stack.shape[0]
        ds.Rows, ds.Columns = stack.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        # An identity window, so the decoded grey values are the stored ones (without a window
        # the decoder stretches each frame's min..max to 0..255).
        ds.WindowCenter = 127.5
        ds.WindowWidth = 256
        ds.PixelData = np.ascontiguousarray(stack, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
