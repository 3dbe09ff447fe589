"""Uploaded bytes -> one 8-bit grayscale frame: the only place where an image gets decoded.

Formats are told apart by magic numbers (`sniff_format`), never by a file name or by what the client
declared; a declaration that disagrees with the bytes is an error, not a hint.

- PNG: signature ``89 50 4E 47 0D 0A 1A 0A`` at offset 0.
- JPEG: SOI marker followed by any marker, ``FF D8 FF``, at offset 0.
- DICOM: ``DICM`` at offset 128, i.e. a PS3.10 file with its preamble. A bare dataset without
  the preamble is rejected as unsupported, as `pydicom.dcmread(..., force=False)` rejects it:
  telling such a stream from random bytes is guesswork, and PACS exports and STOW-RS bodies are
  PS3.10 files.

Size caps are checked from the header, before any pixel is decoded: ``rows * cols <= max_pixels``
per frame; the frame's decoded size, ``rows * cols * samples * bytes per sample <=
max_decoded_bytes``; the longer side at most ``max_aspect_ratio`` times the shorter (a 8 x 1,000,000
strip is tiny as a file and as pixels, but preprocessing scales its shorter side up);
``frames <= max_frames``, and both sides ``>= MIN_SIDE``. A DICOM must also hold the frames it
declares (enough native bytes, or at least one fragment per frame). Every header field the decoder
uses is checked for type and multiplicity first, so a malformed header is a `CorruptImageError`,
never a TypeError. Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` plays no part (see
`_PILLOW_OPENERS`).

Conversions to (H, W) uint8, one rule per case:

- 8-bit grayscale (L): as is.
- 16-bit grayscale (I;16, I;16B, I): full-range linear, ``round(v / 257)``, so 65535 -> 255.
- RGB, palette (P), CMYK and other colour modes: to RGB, then ITU-R BT.601 luma
  ``0.299 R + 0.587 G + 0.114 B`` (Pillow's ``convert("L")``, which DICOM colour also goes through).
- Alpha (RGBA, LA, PA): ignored, not composited; the colour channels are taken as they are.
- 1-bit: 0 -> 0, 1 -> 255.
- EXIF orientation is applied first, so the array is upright as a viewer shows it.
- Animated PNG: the first frame.
- DICOM colour (RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT, PALETTE COLOR): pydicom 3 already
  returns YBR as RGB (the decoder reports the resulting photometric interpretation, which we follow,
  so nothing is converted twice); palettes go through their LUT; samples deeper than 8 bits are
  scaled full-range linear to 8 bits; then the same luma.
- DICOM monochrome: modality LUT or rescale, then the VOI LUT if present, else the first window
  (Window Center/Width, with its VOI LUT Function), mapped linearly from the VOI output range to
  0..255; with neither, the frame's own min..max is stretched to 0..255 (a constant frame gives 0).
  MONOCHROME1 is then inverted.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin
from pydicom import Dataset, dcmread
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
    convert_color_space,
    get_decoder,
)

from shared.errors import (
    CorruptImageError,
    EmptyInputError,
    FormatMismatchError,
    FrameOutOfRangeError,
    ImageTooLargeError,
    ImageTooSmallError,
    InvalidDicomValueError,
    NoPixelDataError,
    UnsupportedDicomError,
    UnsupportedFormatError,
)

log = logging.getLogger(__name__)

FORMATS = ("png", "jpeg", "dicom")
DEFAULT_MAX_PIXELS = 40_000_000  # per frame, rows * cols
DEFAULT_MAX_FRAMES = 2_000
# One frame as decoded, before conversion to 8-bit gray: 40 M pixels of 8-bit RGB fit, 16-bit
# RGB of that size (240 MB) does not.
DEFAULT_MAX_DECODED_BYTES = 128 * 1024 * 1024
# Ultrasound frames are 4:3 to 16:9, panoramic sweeps a few times wider; 10:1 leaves room.
DEFAULT_MAX_ASPECT_RATIO = 10.0
MIN_SIDE = 8
# Rows of float64 temporaries worked on at a time when scaling to 8 bits (bounds peak memory).
_SCALE_BLOCK_VALUES = 1 << 21
# Rescale and window values beyond these are not ultrasound (or CT) values but broken headers.
_MAX_ABS_DISPLAY_VALUE = 1e7

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
_DICOM_PREFIX_OFFSET = 128

# Opening the plugin class directly restricts parsing to the sniffed format, as
# Image.open(formats=[...]) would, but skips Image.open's check against the process-wide
# Image.MAX_IMAGE_PIXELS: our own cap alone decides, and client input never raises Pillow's
# DecompressionBombWarning (which any `-W error` run would turn into a crash).
_PILLOW_OPENERS = {"png": PngImagePlugin.PngImageFile, "jpeg": JpegImagePlugin.JpegImageFile}
# What Pillow raises on malformed input, as opposed to bugs in this module.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, struct.error)
_PILLOW_16_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_DICOM_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_DICOM_YBR_FULL = ("YBR_FULL", "YBR_FULL_422")
# YBR_RCT / YBR_ICT only occur in JPEG 2000, whose decoders undo the colour transform.
_DICOM_PHOTOMETRIC = (
    *_DICOM_MONOCHROME,
    *_DICOM_YBR_FULL,
    "RGB",
    "PALETTE COLOR",
    "YBR_RCT",
    "YBR_ICT",
)


@dataclass(frozen=True)
class DecodedImage:
    """One decoded frame: the canonical input of preprocessing."""

    pixels: np.ndarray  # (H, W) uint8 grayscale, C-contiguous
    format: str  # one of FORMATS
    frame: int  # index of the frame analysed (0 for single-frame images)
    n_frames: int  # 1 for PNG/JPEG
    # A DICOM's header (every element but the pixel data, group 7FE0), so that results can cite
    # the source's study, series and instance; None for PNG and JPEG. Shared by every frame of
    # the file: never edit it.
    dicom: Dataset | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        p = self.pixels
        if p.ndim != 2 or p.dtype != np.uint8 or not p.flags.c_contiguous:
            raise ValueError("pixels must be a C-contiguous (H, W) uint8 array")
        if self.format not in FORMATS or not 0 <= self.frame < self.n_frames:
            raise ValueError("format must be one of FORMATS and 0 <= frame < n_frames")


def sniff_format(data: bytes) -> str | None:
    """Return "png", "jpeg" or "dicom" from the magic numbers of `data`, or None. Raises nothing."""
    # PNG and JPEG first: their signatures sit at offset 0, while a DICOM preamble is free-form.
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(_JPEG_SOI):
        return "jpeg"
    if data[_DICOM_PREFIX_OFFSET : _DICOM_PREFIX_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def decode_image(
    data: bytes,
    *,
    declared_format: str | None = None,
    frame: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> DecodedImage:
    """Decode PNG, JPEG or DICOM bytes to one (H, W) uint8 grayscale frame.

    `declared_format` is the client's claim (one of FORMATS) or None to go by the bytes alone.

    Raises EmptyInputError, UnsupportedFormatError, FormatMismatchError, CorruptImageError,
    ImageTooLargeError, ImageTooSmallError, FrameOutOfRangeError, and for DICOM also
    NoPixelDataError, UnsupportedDicomError and InvalidDicomValueError. Raises ValueError for a
    `declared_format` outside FORMATS and RuntimeError if Pillow was set to accept truncated
    images: both are caller bugs.
    """
    if frame < 0:
        _check_declared(data, declared_format)
        raise FrameOutOfRangeError("The requested frame does not exist; frames count from 0.")
    image = open_image(
        data,
        declared_format=declared_format,
        max_pixels=max_pixels,
        max_frames=max_frames,
        max_decoded_bytes=max_decoded_bytes,
        max_aspect_ratio=max_aspect_ratio,
    )
    return image.decode(frame)


class OpenedImage:
    """An image file whose header passed every check, its frames decoded one at a time.

    Made by `open_image`. A cine loop is parsed once and each frame decoded on its own, so the
    whole loop is never held decoded.
    """

    def __init__(self, data: bytes, fmt: str, caps: _Caps) -> None:
        self._data = data
        self.format = fmt
        self._caps = caps
        self._dicom: _DicomFile | None = _open_dicom(data, caps) if fmt == "dicom" else None

    @property
    def n_frames(self) -> int:
        return self._dicom.header.n_frames if self._dicom else 1

    @property
    def dicom(self) -> Dataset | None:
        """The DICOM header without its pixel data; None for PNG and JPEG."""
        return self._dicom.header_dataset if self._dicom else None

    def decode(self, frame: int) -> DecodedImage:
        """Frame `frame` (0-based) as an (H, W) uint8 grayscale array.

        Raises FrameOutOfRangeError, CorruptImageError, ImageTooLargeError, ImageTooSmallError,
        and for DICOM UnsupportedDicomError and InvalidDicomValueError.
        """
        if frame < 0:
            raise FrameOutOfRangeError("The requested frame does not exist; frames count from 0.")
        if self._dicom is not None:
            decoded = _decode_dicom_frame(self._dicom, frame)
        else:
            decoded = _decode_pillow(self._data, self.format, frame, self._caps)
        log.debug(
            "decoded image",
            extra={
                "format": self.format,
                "shape": decoded.pixels.shape,
                "frame": frame,
                "n_frames": decoded.n_frames,
            },
        )
        return decoded


def open_image(
    data: bytes,
    *,
    declared_format: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> OpenedImage:
    """Check the bytes' format and, for a DICOM, its header against the caps; decode no pixel.

    PNG and JPEG headers are checked when their one frame is decoded. Raises what decode_image
    raises, except FrameOutOfRangeError (that is `OpenedImage.decode`'s).
    """
    fmt = _check_declared(data, declared_format)
    caps = _Caps(max_pixels, max_frames, max_decoded_bytes, max_aspect_ratio)
    return OpenedImage(data, fmt, caps)


# --- shared helpers ------------------------------------------------------------------------------


class _Caps(NamedTuple):
    max_pixels: int
    max_frames: int
    max_decoded_bytes: int
    max_aspect_ratio: float


def _check_declared(data: bytes, declared_format: str | None) -> str:
    """The sniffed format of `data`, refused when empty, unknown or not as declared."""
    if declared_format is not None and declared_format not in FORMATS:
        raise ValueError(f"declared_format must be one of {FORMATS} or None")
    if not data:
        raise EmptyInputError("The request contained no image data.")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError("The data is not a PNG, JPEG or DICOM file.")
    if declared_format is not None and declared_format != fmt:
        raise FormatMismatchError(
            f"The data was declared as {declared_format.upper()} but is {fmt.upper()}."
        )
    return fmt


def _check_dimensions(rows: int, cols: int, frame_bytes: int, caps: _Caps) -> None:
    """Refuse from the header alone: too many pixels or bytes, too thin, too small."""
    if rows * cols > caps.max_pixels:
        raise ImageTooLargeError(
            f"The image has more than {caps.max_pixels} pixels; it was not decoded."
        )
    if frame_bytes > caps.max_decoded_bytes:
        raise ImageTooLargeError(
            f"The image would take more than {caps.max_decoded_bytes} bytes decoded; "
            "it was not decoded."
        )
    if min(rows, cols) < MIN_SIDE:
        raise ImageTooSmallError(f"The image must be at least {MIN_SIDE} pixels on each side.")
    if max(rows, cols) > caps.max_aspect_ratio * min(rows, cols):
        raise ImageTooLargeError(
            f"The image is more than {caps.max_aspect_ratio:g} times longer than it is wide; "
            "it was not decoded."
        )


def _check_single_frame(frame: int) -> None:
    if frame != 0:
        raise FrameOutOfRangeError("The requested frame does not exist; this image has one frame.")


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto 0..255, clipping outside and rounding to nearest.

    Works on blocks of rows, so the float64 temporary stays a few MB whatever the frame's size.
    """
    out = np.zeros(values.shape, dtype=np.uint8)
    if not high > low:  # also false for NaN bounds
        return out
    factor = 255.0 / (high - low)
    per_row = max(1, math.prod(values.shape[1:]))
    step = max(1, _SCALE_BLOCK_VALUES // per_row)
    for start in range(0, values.shape[0], step):
        block = values[start : start + step].astype(np.float64)
        block -= low
        block *= factor
        np.clip(block, 0.0, 255.0, out=block)
        out[start : start + step] = np.rint(block, out=block)
    return out


def _rgb_to_luma(rgb: np.ndarray, max_value: int) -> np.ndarray:
    """(H, W, 3) RGB with samples in 0..max_value -> (H, W) uint8 BT.601 luma."""
    if rgb.dtype != np.uint8:
        rgb = _scale_to_uint8(rgb, 0, max_value)
    # Pillow's convert("L") is the one luma implementation, shared with the PNG/JPEG path.
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("L"))


def _log_failure(stage: str, exc: BaseException) -> None:
    # The exception's type only: library messages may quote header values (patient data).
    log.info("image rejected", extra={"stage": stage, "error_type": type(exc).__name__})


# --- PNG / JPEG ----------------------------------------------------------------------------------


# Bytes per pixel of Pillow's in-memory modes (Pillow keeps 1-bit images one byte per pixel).
_PILLOW_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "LA": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2}


def _decode_pillow(data: bytes, fmt: str, frame: int, caps: _Caps) -> DecodedImage:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide switch someone else flipped: truncated uploads would decode as partly
        # grey images and be classified. Fail loudly instead of silently.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES must stay False")
    _check_single_frame(frame)
    name = fmt.upper()
    try:
        image = _PILLOW_OPENERS[fmt](BytesIO(data))
    except _PILLOW_ERRORS as exc:
        _log_failure(f"{fmt} header", exc)
        raise CorruptImageError(f"The {name} header is invalid.") from exc

    with image:
        bytes_per_pixel = _PILLOW_MODE_BYTES.get(image.mode, 4)  # RGB(A), CMYK, I, F: 4
        frame_bytes = image.height * image.width * bytes_per_pixel
        _check_dimensions(image.height, image.width, frame_bytes, caps)
        try:
            image.load()
            pixels = _pillow_to_gray(ImageOps.exif_transpose(image))
        except _PILLOW_ERRORS as exc:
            _log_failure(f"{fmt} pixels", exc)
            raise CorruptImageError(f"The {name} image is truncated or corrupt.") from exc
    return DecodedImage(np.ascontiguousarray(pixels), fmt, 0, 1)


def _pillow_to_gray(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.array(image)
    if mode in _PILLOW_16_BIT_MODES:
        return _scale_to_uint8(np.asarray(image), 0, 65535)
    if mode in ("1", "LA"):  # LA: the alpha channel is dropped, not composited
        return np.array(image.convert("L"))
    # P, PA, RGB, RGBA, CMYK, YCbCr, ...: alpha is dropped by the RGB step.
    return np.array(image.convert("RGB").convert("L"))


# --- DICOM ---------------------------------------------------------------------------------------


class _DicomHeader(NamedTuple):
    rows: int
    cols: int
    samples: int
    bits_allocated: int
    n_frames: int
    photometric: str
    transfer_syntax: str

    def frame_bytes(self) -> int:
        """Bytes of one frame as decoded (before any conversion to 8-bit gray)."""
        return self.rows * self.cols * self.samples * max(1, self.bits_allocated // 8)


class _BadField(Exception):
    """A header field of the wrong type, multiplicity or range (carries the keyword only)."""


def _header_int(ds: Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int:
    """An integer header field with value multiplicity 1 and low <= value <= high.

    pydicom keeps a value it cannot convert (IS `1A`, US of the wrong length) as a str or bytes,
    and a backslash-separated one as a MultiValue: all of those are refused here, by keyword.
    """
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise _BadField(keyword)
        return default
    if isinstance(value, MultiValue | str | bytes | float) or not isinstance(value, int):
        raise _BadField(keyword)
    if not low <= int(value) <= high:
        raise _BadField(keyword)
    return int(value)


def _header_text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not isinstance(value, str) or isinstance(value, MultiValue):
        raise _BadField(keyword)
    return value.strip().upper()


def _read_dicom(data: bytes) -> tuple[Dataset, _DicomHeader | None]:
    """Parse the dataset and, when it has pixel data, the image header. Raises CorruptImageError."""
    try:
        ds = dcmread(BytesIO(data), force=False)
        if "PixelData" not in ds:
            return ds, None
        # Element values are converted lazily: reading a field is where pydicom fails.
        header = _DicomHeader(
            rows=_header_int(ds, "Rows", 1, 65535),
            cols=_header_int(ds, "Columns", 1, 65535),
            samples=_header_int(ds, "SamplesPerPixel", 1, 4, default=1),
            bits_allocated=_header_int(ds, "BitsAllocated", 1, 64),
            n_frames=_header_int(ds, "NumberOfFrames", 1, 2**31 - 1, default=1),
            photometric=_header_text(ds, "PhotometricInterpretation"),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        )
    except _BadField as exc:
        _log_failure("dicom header", exc)
        raise CorruptImageError(f"The DICOM header field {exc} is missing or malformed.") from None
    # pydicom raises a wide range of types on malformed input; none of them is our bug to surface.
    except Exception as exc:
        _log_failure("dicom header", exc)
        # `from None`: pydicom's messages may quote element values, keep them out of tracebacks.
        raise CorruptImageError("The DICOM file or its image header cannot be read.") from None
    return ds, header


def _frames_in_data(ds: Dataset, header: _DicomHeader) -> int:
    """How many frames the Pixel Data can hold: native bytes / frame size, or for encapsulated
    data the Extended or Basic Offset Table's entries, else the fragments (a frame spans one or
    more fragments, so there are never fewer fragments than frames)."""
    pixel_data = ds.PixelData
    if not isinstance(pixel_data, bytes | bytearray):
        raise CorruptImageError("The DICOM pixel data cannot be read.")
    element = ds["PixelData"]
    if not element.is_undefined_length:
        if header.photometric == "YBR_FULL_422":  # PS3.5 8.2.3: two samples per pixel stored
            bits = header.rows * header.cols * 2 * header.bits_allocated
        else:
            bits = header.rows * header.cols * header.samples * header.bits_allocated
        return len(pixel_data) * 8 // max(1, bits)
    extended = ds.get("ExtendedOffsetTable")
    if isinstance(extended, bytes) and extended:
        return len(extended) // 8
    offsets = parse_basic_offsets(pixel_data)
    if len(offsets) > 1:
        return len(offsets)
    # The fragments start after the Basic Offset Table's item: an 8-byte header, 4 per entry.
    return parse_fragments(pixel_data[8 + 4 * len(offsets) :])[0]


class _DicomFile(NamedTuple):
    ds: Dataset  # as read, pixel data included
    header: _DicomHeader
    header_dataset: Dataset  # every element but the pixel data, for DecodedImage.dicom


def _without_pixel_data(ds: Dataset) -> Dataset:
    """A dataset of `ds`'s elements but group 7FE0 (the pixel data), the elements shared.

    The elements are taken as read (raw, converted when first used), so copying converts and
    checks nothing; the file meta comes along for the transfer syntax.
    """
    header = Dataset()
    header.update({tag: element for tag, element in ds.items() if tag.group != 0x7FE0})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def _open_dicom(data: bytes, caps: _Caps) -> _DicomFile:
    """Read and check the header: every cap and consistency check that needs no pixel."""
    ds, header = _read_dicom(data)
    if header is None:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise UnsupportedDicomError(
                "DICOM images with floating-point pixels are not supported."
            )
        if len(ds) == 0 or "Rows" in ds or "Columns" in ds:
            # pydicom meets a truncated undefined-length element (encapsulated Pixel Data) with a
            # warning and an incomplete, often empty, dataset: a broken upload, not a report.
            raise CorruptImageError("The DICOM pixel data is missing or truncated.")
        raise NoPixelDataError("The DICOM object holds no image (e.g. a report or a plan).")

    _check_dimensions(header.rows, header.cols, header.frame_bytes(), caps)
    if header.n_frames > caps.max_frames:
        raise ImageTooLargeError(
            f"The image has more than {caps.max_frames} frames; it was not decoded."
        )
    if header.samples not in (1, 3) or header.photometric not in _DICOM_PHOTOMETRIC:
        raise UnsupportedDicomError("The DICOM photometric interpretation is not supported.")
    # PS3.3 C.7.6.3.1.2: monochrome and palette images have one sample per pixel, colour three.
    one_sample = header.photometric in (*_DICOM_MONOCHROME, "PALETTE COLOR")
    if (header.samples == 1) != one_sample:
        raise CorruptImageError(
            "The DICOM samples per pixel do not match its photometric interpretation."
        )
    try:
        held = _frames_in_data(ds, header)
    except CorruptImageError:
        raise
    except Exception as exc:  # pydicom's fragment parser on a broken item sequence
        _log_failure("dicom fragments", exc)
        raise CorruptImageError("The DICOM pixel data cannot be read.") from None
    if held < header.n_frames:
        raise CorruptImageError(
            "The DICOM pixel data is truncated or holds fewer frames than the "
            f"{header.n_frames} it declares; it was not decoded."
        )
    return _DicomFile(ds, header, _without_pixel_data(ds))


def _decode_dicom_frame(dicom: _DicomFile, frame: int) -> DecodedImage:
    ds, header = dicom.ds, dicom.header
    if frame >= header.n_frames:
        raise FrameOutOfRangeError(
            f"The requested frame does not exist: this image has {header.n_frames} "
            f"frame{'s' if header.n_frames != 1 else ''}, numbered from 0."
        )

    try:
        decoder = get_decoder(header.transfer_syntax)
    except NotImplementedError:
        decoder = None
    if decoder is None or not decoder.is_available:
        raise UnsupportedDicomError("The DICOM transfer syntax is not supported.")

    try:
        # index=frame decodes that frame only, never the whole cine.
        frame_pixels, props = decoder.as_array(ds, index=frame)
    except Exception as exc:  # decoder plugins raise assorted types on bad codestreams
        _log_failure("dicom pixels", exc)
        raise CorruptImageError("The DICOM pixel data cannot be decoded.") from None

    try:
        pixels = _dicom_to_gray(
            frame_pixels, ds, str(props["photometric_interpretation"]), int(props["bits_stored"])
        )
    except InvalidDicomValueError:
        raise
    except NotImplementedError as exc:
        _log_failure("dicom lut", exc)
        raise UnsupportedDicomError("The DICOM display transform is not supported.") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        _log_failure("dicom lut", exc)
        raise CorruptImageError("The DICOM display transform parameters are invalid.") from None
    if pixels.shape != (header.rows, header.cols) or pixels.dtype != np.uint8:
        # A decoder that disagrees with the header (e.g. a photometric interpretation it
        # changed): refuse rather than analyse something of another shape.
        raise CorruptImageError("The DICOM pixel data does not match its header.")
    return DecodedImage(
        np.ascontiguousarray(pixels), "dicom", frame, header.n_frames, dicom.header_dataset
    )


def _dicom_to_gray(arr: np.ndarray, ds: Dataset, photometric: str, bits_stored: int) -> np.ndarray:
    """One decoded frame, in the photometric interpretation the decoder reported -> uint8 gray."""
    if photometric in _DICOM_MONOCHROME:
        gray = _monochrome_to_uint8(arr, ds)
        # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum sample value is displayed as white.
        return 255 - gray if photometric == "MONOCHROME1" else gray
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _rgb_to_luma(rgb, 255 if rgb.dtype == np.uint8 else 65535)
    if photometric in _DICOM_YBR_FULL:  # pydicom 3 converts these itself; kept for raw decoders
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise NotImplementedError(photometric)
    return _rgb_to_luma(arr, 2**bits_stored - 1)


def _finite_display_values(ds: Dataset, keywords: tuple[str, ...]) -> None:
    """Refuse rescale and window values that are not finite or far outside any real range.

    A NaN slope or an infinite width would map every pixel to 0 and be analysed as a blank
    frame; that must be a refusal, not a "normal" answer.
    """
    for keyword in keywords:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        values = value if isinstance(value, MultiValue | list | tuple) else [value]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise CorruptImageError(f"The DICOM header field {keyword} is malformed.") from None
        if not all(math.isfinite(v) and abs(v) <= _MAX_ABS_DISPLAY_VALUE for v in numbers):
            raise InvalidDicomValueError(
                f"The DICOM {keyword} is not a finite value within +/-{_MAX_ABS_DISPLAY_VALUE:g}."
            )
    if "RescaleSlope" in keywords and ds.get("RescaleSlope") not in (None, ""):
        if float(ds.RescaleSlope) == 0:
            raise InvalidDicomValueError("The DICOM RescaleSlope is 0: every pixel would be equal.")
    width = ds.get("WindowWidth")
    if "WindowWidth" in keywords and width not in (None, ""):
        first = width[0] if isinstance(width, MultiValue) else width
        if float(first) < 1:  # PS3.3 C.11.2.1.2.1: Window Width shall be >= 1
            raise InvalidDicomValueError("The DICOM WindowWidth is below 1.")


def _row_blocks(arr: np.ndarray) -> range:
    """Start rows of blocks of about _SCALE_BLOCK_VALUES values (step: `.step`)."""
    step = max(1, _SCALE_BLOCK_VALUES // max(1, math.prod(arr.shape[1:])))
    return range(0, arr.shape[0], step)


def _monochrome_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    # PS3.4 N.2: stored values -> modality LUT (e.g. rescale to HU) -> VOI LUT -> presentation.
    # Every step is elementwise, so it runs on blocks of rows: pydicom's float64 temporaries then
    # stay a few MB instead of 8 bytes per pixel of a 40 M pixel frame, several times over.
    _finite_display_values(ds, ("RescaleSlope", "RescaleIntercept"))
    voi_lut = ds.get("VOILUTSequence")
    if voi_lut and "LUTDescriptor" in voi_lut[0] and "LUTData" in voi_lut[0]:
        # A VOI LUT wins over a window, as in pydicom's apply_voi_lut. Its output range is
        # 0..2**n - 1 with n the third LUT Descriptor value (PS3.3 C.11.2.1.1).
        low, high = 0, 2 ** int(voi_lut[0].LUTDescriptor[2]) - 1

        def display(stored: np.ndarray) -> np.ndarray:
            return apply_voi(np.rint(apply_modality_lut(stored, ds)).astype(np.int64), ds)

    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        _finite_display_values(ds, ("WindowCenter", "WindowWidth"))
        # pydicom maps the window onto an output range that depends on BitsStored, signedness and
        # rescale; windowing the two infinities reads that range back without re-deriving it.
        low, high = apply_windowing(np.array([-np.inf, np.inf]), ds)

        def display(stored: np.ndarray) -> np.ndarray:
            return apply_windowing(apply_modality_lut(stored, ds), ds)

    else:
        low, high = math.inf, -math.inf
        blocks = _row_blocks(arr)
        for i in blocks:
            values = apply_modality_lut(arr[i : i + blocks.step], ds)
            low, high = min(low, float(values.min())), max(high, float(values.max()))

        def display(stored: np.ndarray) -> np.ndarray:
            return apply_modality_lut(stored, ds)

    out = np.empty(arr.shape, dtype=np.uint8)
    blocks = _row_blocks(arr)
    for i in blocks:
        out[i : i + blocks.step] = _scale_to_uint8(display(arr[i : i + blocks.step]), low, high)
    return out


def read_dicom_header(data: bytes, keywords: Sequence[str]) -> Dataset | None:
    """The attributes `keywords` names (and the file meta) of a PS3.10 file's header, read
    without its pixel data; None when no header can be read. Raises nothing.

    The values are converted when first read, which raises for one pydicom cannot convert (a
    US of odd length, an IS that is no number): callers read them under their own guard and say
    what that means for them (the decoder's checks, a STOW-RS failure reason, an audit record
    without UIDs). The one reader of headers ahead of decoding, used by the ultrasound policy,
    the audit log and STOW-RS ingest.
    """
    try:
        return dcmread(
            BytesIO(data), force=False, stop_before_pixels=True, specific_tags=list(keywords)
        )
    except Exception:  # any unreadable header; nothing is logged, headers hold patient data
        return None
