"""Fuzzing the decoder: mutated PNG, JPEG and DICOM files must decode or raise an InputError.

Hypothesis mutates real files (made here, and pydicom's shipped ones) at three levels: the bytes,
the PNG chunk fields (with valid CRCs, so the mutation reaches the decoder behind the checksum),
and the DICOM header fields the decoder reads (any raw bytes, injected as VR UN so pydicom takes
them as the field's own VR). Anything else that escapes `decode_image` is a crash: its input is
written to tests/shared/fuzz_corpus/, and `test_corpus_input_is_decoded_or_refused` replays every
file kept there, so each crasher found stays a regression test.

Bounded for CI: FUZZ_EXAMPLES (default 150) examples per target, about a minute in all on 2
cores; raise it for longer runs (or use tests/fuzz/atheris_decoder.py with Atheris).
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import Dataset, FileMetaDataset, dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, UltrasoundImageStorage, generate_uid

from shared.decoding import DecodedImage, decode_image
from shared.errors import InputError

CORPUS = Path(__file__).parent / "fuzz_corpus"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
# Small caps keep each example cheap; the caps' own logic is what the header fuzz probes.
CAPS = {"max_pixels": 4_000_000, "max_frames": 64, "max_decoded_bytes": 16 * 1024 * 1024}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_decodes_or_refuses(data: bytes, frame: int = 0) -> None:
    """The fuzz property; on any other exception the input joins the corpus."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on odd values; warnings are not crashes
            decoded = decode_image(data, frame=frame, **CAPS)
    except InputError:
        return
    except Exception:
        CORPUS.mkdir(exist_ok=True)
        name = f"crash-{hashlib.sha256(data).hexdigest()[:16]}-frame{frame}.bin"
        (CORPUS / name).write_bytes(data)
        raise
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.ndim == 2


# --- seeds -------------------------------------------------------------------------------------


def _gradient(height: int = 24, width: int = 32) -> np.ndarray:
    return (np.arange(height * width).reshape(height, width) % 251).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _dicom_seed(pixels: np.ndarray, photometric: str, compress: bool = False, **elements) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "US"
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(pixels, photometric, pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if compress:
        ds.compress(RLELossless)
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _pydicom_files(*names: str) -> list[bytes]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return [(folder / n).read_bytes() for n in names if (folder / n).is_file()]


_GRAY = _gradient()
PNG_SEEDS = [
    _save(Image.fromarray(_GRAY), "PNG"),
    _save(Image.fromarray(np.dstack([_GRAY] * 3)), "PNG"),
    _save(Image.fromarray(_GRAY.astype(np.uint16) * 257), "PNG"),
    _save(Image.fromarray(_GRAY).convert("P"), "PNG"),
    _save(Image.fromarray(_GRAY).convert("1"), "PNG"),
]
JPEG_SEEDS = [
    _save(Image.fromarray(_GRAY), "JPEG", quality=90),
    _save(Image.fromarray(np.dstack([_GRAY] * 3)), "JPEG", quality=90, progressive=True),
]
DICOM_SEEDS = [
    _dicom_seed(_GRAY.astype(np.uint16) * 100, "MONOCHROME2", RescaleSlope="2",
                RescaleIntercept="-100", WindowCenter="2000", WindowWidth="3000"),
    _dicom_seed(_GRAY, "MONOCHROME1"),
    _dicom_seed(np.dstack([_GRAY] * 3), "RGB"),
    _dicom_seed(np.stack([_GRAY] * 3), "MONOCHROME2"),  # 3 frames
    _dicom_seed(_GRAY, "MONOCHROME2", compress=True),
    _dicom_seed(_GRAY, "PALETTE COLOR", RedPaletteColorLookupTableDescriptor=[256, 0, 8],
                GreenPaletteColorLookupTableDescriptor=[256, 0, 8],
                BluePaletteColorLookupTableDescriptor=[256, 0, 8],
                RedPaletteColorLookupTableData=bytes(range(256)),
                GreenPaletteColorLookupTableData=bytes(range(256)),
                BluePaletteColorLookupTableData=bytes(range(256))),
    *_pydicom_files("SC_rgb_jpeg.dcm", "examples_palette.dcm", "JPEGLSNearLossless_16.dcm"),
]  # fmt: skip
_OWN_DICOM_SEEDS = 6


# --- mutations ---------------------------------------------------------------------------------


@st.composite
def byte_mutations(draw, seeds: list[bytes]) -> bytes:
    """A seed with 1-6 byte-level edits: set, flip, insert, delete, duplicate, truncate."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "dup", "truncate"]))
        if op == "set":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 256))]
        else:
            del data[max(pos, 1) :]
    return bytes(data)


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


@st.composite
def png_fields(draw) -> bytes:
    """A PNG built from arbitrary IHDR fields and (valid-CRC) chunks: reaches past the CRCs."""
    width = draw(st.sampled_from([0, 1, 7, 8, 9, 64, 81, 4096, 2**31 - 1, 2**32 - 1]))
    height = draw(st.sampled_from([0, 1, 8, 32, 1000, 65535, 2**31 - 1]))
    depth = draw(st.sampled_from([0, 1, 2, 4, 8, 16, 3, 32]))
    colour = draw(st.sampled_from([0, 2, 3, 4, 6, 1, 5, 7]))
    interlace = draw(st.sampled_from([0, 1, 2]))
    raw = draw(st.binary(max_size=512))
    idat = zlib.compress(raw) if draw(st.booleans()) else raw
    chunks = [
        _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    ]
    if draw(st.booleans()):
        chunks.append(_chunk(b"PLTE", draw(st.binary(max_size=48))))
    if draw(st.booleans()):
        kind = draw(
            st.sampled_from([b"tRNS", b"eXIf", b"iCCP", b"acTL", b"fcTL", b"sBIT", b"gAMA"])
        )
        chunks.append(_chunk(kind, draw(st.binary(max_size=64))))
    chunks.append(_chunk(b"IDAT", idat))
    chunks.append(_chunk(b"IEND", b""))
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


# The header fields the decoder (and pydicom's decoders under it) read, with edge-case values.
DICOM_FIELDS = {
    0x00280010: "Rows",
    0x00280011: "Columns",
    0x00280002: "SamplesPerPixel",
    0x00280008: "NumberOfFrames",
    0x00280100: "BitsAllocated",
    0x00280101: "BitsStored",
    0x00280102: "HighBit",
    0x00280103: "PixelRepresentation",
    0x00280004: "PhotometricInterpretation",
    0x00280006: "PlanarConfiguration",
    0x00281052: "RescaleIntercept",
    0x00281053: "RescaleSlope",
    0x00281050: "WindowCenter",
    0x00281051: "WindowWidth",
    0x00281056: "VOILUTFunction",
    0x00080005: "SpecificCharacterSet",
    0x00280301: "BurnedInAnnotation",
}
RAW_VALUES = [
    b"", b"\x00", b"\x00\x00", b"\xff\xff", b"\x01\x00", b"\x03\x00", b"\x10\x00", b"\x00\x80",
    b"\x01\x00\x02\x00", b"1A", b"abc ", b"1\\2 ", b"-1", b"0 ", b"NaN ", b"inf ", b"-inf",
    b"1e308 ", b"2000", b"65536 ", b"MONOCHROME1 ", b"RGB ", b"PALETTE COLOR ", b"YBR_FULL_422",
    b"ISO_IR 100", b"\\ISO 2022 IR 87", b"SIGMOID ", b"\xc3\x28", b"\x00" * 9,
]  # fmt: skip


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def _un_element(tag: int, raw: bytes) -> bytes:
    """One explicit-VR little-endian element of VR UN: pydicom reads it as the tag's own VR."""
    return (
        struct.pack("<HH", tag >> 16, tag & 0xFFFF)
        + b"UN\x00\x00"
        + struct.pack("<I", len(raw))
        + raw
    )


@st.composite
def dicom_fields(draw) -> bytes:
    """A DICOM seed with 1-4 of its image header fields replaced by raw bytes (as VR UN)."""
    seed = draw(st.sampled_from(DICOM_SEEDS[:_OWN_DICOM_SEEDS]))  # ours round-trip through pydicom
    ds = pydicom.dcmread(BytesIO(seed))
    fields: dict[int, bytes] = {}
    for _ in range(draw(st.integers(1, 4))):
        tag = draw(st.sampled_from(sorted(DICOM_FIELDS)))
        raw = draw(st.one_of(st.sampled_from(RAW_VALUES), st.binary(max_size=12)))
        fields[tag] = raw + b" " if len(raw) % 2 else raw
        if tag in ds:
            del ds[tag]
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    # In tag order, just before Pixel Data, which all these fields precede.
    at = data.rfind(_PIXEL_DATA_TAG)
    injected = b"".join(_un_element(tag, fields[tag]) for tag in sorted(fields))
    return data[:at] + injected + data[at:]


# --- the fuzz targets --------------------------------------------------------------------------


@FUZZ
@given(data=byte_mutations(PNG_SEEDS + JPEG_SEEDS))
def test_fuzz_mutated_png_and_jpeg_bytes(data: bytes) -> None:
    check_decodes_or_refuses(data)


@FUZZ
@given(data=png_fields())
def test_fuzz_png_header_and_chunk_fields(data: bytes) -> None:
    check_decodes_or_refuses(data)


@FUZZ
@given(data=byte_mutations(DICOM_SEEDS), frame=st.sampled_from([0, 1, 2, 7]))
def test_fuzz_mutated_dicom_bytes(data: bytes, frame: int) -> None:
    check_decodes_or_refuses(data, frame)


@FUZZ
@given(data=dicom_fields(), frame=st.sampled_from([0, 0, 1, 2]))
def test_fuzz_dicom_header_fields(data: bytes, frame: int) -> None:
    check_decodes_or_refuses(data, frame)


@pytest.mark.parametrize(
    "path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name.removesuffix(".bin")
)
def test_corpus_input_is_decoded_or_refused(path: Path) -> None:
    frame = int(path.stem.rsplit("frame", 1)[1]) if "frame" in path.stem else 0
    check_decodes_or_refuses(path.read_bytes(), frame)
