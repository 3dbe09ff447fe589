"""decode_image / sniff_format: every format, every conversion rule, every rejection."""

from __future__ import annotations

import struct
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from PIL import Image, ImageFile
from pydicom import Dataset, FileMetaDataset, dcmwrite
from pydicom.uid import (
    MPEG2MPML,
    BasicTextSRStorage,
    ExplicitVRLittleEndian,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from shared.decoding import (
    DEFAULT_MAX_PIXELS,
    FORMATS,
    MIN_SIDE,
    DecodedImage,
    decode_image,
    sniff_format,
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

# BT.601 luma of pure red, green, blue, as Pillow rounds it: (255 * w + 2**15) >> 16 for the
# weights w = 19595, 38470, 7471 (0.299, 0.587, 0.114 in 16-bit fixed point).
RED_GREEN_BLUE_LUMA = [76, 150, 29]


# --- builders ------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _png(image: Image.Image, **params) -> bytes:
    return _encode(image, "PNG", **params)


def _jpeg(image: Image.Image, **params) -> bytes:
    return _encode(image, "JPEG", quality=100, **params)


def _halves(mode: str, size: tuple[int, int], left, right) -> Image.Image:
    """An image whose left half is `left` and right half `right` (size is W, H)."""
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grayscale PNG that declares a size but carries one row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1)))
        + _png_chunk(b"IEND", b"")
    )


def _dicom_dataset(
    pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None, **elements
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Modality = "US"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    multi_frame = "NumberOfFrames" in ds
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage if multi_frame else UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **elements) -> bytes:
    return _dicom_bytes(_dicom_dataset(pixels, photometric, **elements))


def _pydicom_test_file(name: str) -> bytes:
    # Look in the package first: get_testdata_file would try to download what is not shipped.
    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom {pydicom.__version__} does not ship {name}")
    return path.read_bytes()


# --- sniffing and format checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "png"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 8, "jpeg"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", "dicom"),
        (b"\x00" * 128 + b"DICX", None),
        (b"\xff\xd8\x00", None),  # SOI without a following marker
        (b"GIF89a", None),
        (b"", None),
    ],
)
def test_sniff_format_reads_magic_numbers_only(data: bytes, expected: str | None) -> None:
    assert sniff_format(data) == expected


def test_formats_are_the_three_supported() -> None:
    assert FORMATS == ("png", "jpeg", "dicom")


def test_decode_rejects_empty_bytes() -> None:
    with pytest.raises(EmptyInputError):
        decode_image(b"")


def test_decode_rejects_text_bytes() -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        decode_image(b"hello, this is not an image\n" * 10, declared_format="png")
    assert info.value.code == "unsupported_format"


def test_decode_rejects_dicom_without_preamble() -> None:
    data = _dicom(np.zeros((8, 8), np.uint8))
    with pytest.raises(UnsupportedFormatError):
        decode_image(data[132:])


@pytest.mark.parametrize(
    ("declared", "data"),
    [
        ("png", _jpeg(Image.new("L", (16, 16)))),
        ("jpeg", _png(Image.new("L", (16, 16)))),
        ("dicom", _png(Image.new("L", (16, 16)))),
        ("png", _dicom(np.zeros((16, 16), np.uint8))),
    ],
)
def test_decode_rejects_declared_format_that_disagrees_with_bytes(
    declared: str, data: bytes
) -> None:
    with pytest.raises(FormatMismatchError) as info:
        decode_image(data, declared_format=declared)
    assert info.value.message.startswith(f"The data was declared as {declared.upper()}")


def test_decode_accepts_matching_declared_format() -> None:
    decoded = decode_image(_png(Image.new("L", (16, 16), 7)), declared_format="png")
    assert (decoded.format, decoded.frame, decoded.n_frames) == ("png", 0, 1)


def test_decode_rejects_unknown_declared_format_as_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        decode_image(_png(Image.new("L", (16, 16))), declared_format="gif")


# --- PNG / JPEG conversions ----------------------------------------------------------------------


def test_decode_keeps_8_bit_gray_png_values() -> None:
    pixels = np.arange(16 * 24, dtype=np.uint16).reshape(16, 24).astype(np.uint8)
    decoded = decode_image(_png(Image.fromarray(pixels)))
    assert decoded.pixels.dtype == np.uint8
    assert decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, pixels)


def test_decode_converts_rgb_png_with_bt601_luma() -> None:
    rgb = np.zeros((8, 24, 3), np.uint8)
    rgb[:, 0:8, 0] = rgb[:, 8:16, 1] = rgb[:, 16:24, 2] = 255
    pixels = decode_image(_png(Image.fromarray(rgb))).pixels
    assert pixels.shape == (8, 24)
    assert [pixels[0, 0], pixels[0, 8], pixels[0, 16]] == RED_GREEN_BLUE_LUMA


def test_decode_ignores_alpha_of_rgba_png() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: not composited over black
    pixels = decode_image(_png(Image.fromarray(rgba, "RGBA"))).pixels
    assert np.all(pixels == RED_GREEN_BLUE_LUMA[0])


def test_decode_ignores_alpha_of_gray_alpha_png() -> None:
    pixels = decode_image(_png(Image.new("LA", (8, 8), (100, 0)))).pixels
    assert np.all(pixels == 100)


def test_decode_converts_palette_png_through_its_colours() -> None:
    image = Image.new("P", (24, 8))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.paste(1, (8, 0, 16, 8))
    image.paste(2, (16, 0, 24, 8))
    pixels = decode_image(_png(image)).pixels
    assert [pixels[0, 0], pixels[0, 8], pixels[0, 16]] == [0, *RED_GREEN_BLUE_LUMA[:2]]


def test_decode_scales_16_bit_png_full_range() -> None:
    values = np.array([0, 257, 1000, 32896, 65278, 65535], np.uint16)
    image = Image.fromarray(np.tile(values, (8, 2)))
    assert image.mode == "I;16"
    pixels = decode_image(_png(image)).pixels
    # round(v / 257): 1000 / 257 = 3.89 -> 4, 65278 / 257 = 254.0
    np.testing.assert_array_equal(pixels[0, :6], [0, 1, 4, 128, 254, 255])


def test_decode_expands_1_bit_png_to_0_and_255() -> None:
    image = _halves("1", (16, 8), 0, 1)
    pixels = decode_image(_png(image)).pixels
    assert (pixels[0, 0], pixels[0, 15]) == (0, 255)
    assert set(np.unique(pixels)) == {0, 255}


def test_decode_takes_first_frame_of_animated_png() -> None:
    frames = [Image.new("L", (8, 8), 10), Image.new("L", (8, 8), 200)]
    data = _png(frames[0], save_all=True, append_images=frames[1:])
    decoded = decode_image(data)
    assert (decoded.frame, decoded.n_frames) == (0, 1)
    assert np.all(decoded.pixels == 10)


def test_decode_reads_gray_jpeg() -> None:
    pixels = decode_image(_jpeg(_halves("L", (32, 16), 0, 255))).pixels
    assert pixels.shape == (16, 32)
    # Flat, block-aligned halves survive JPEG at quality 100 exactly.
    assert (pixels[:, :16].max(), pixels[:, 16:].min()) == (0, 255)


def test_decode_applies_exif_orientation_to_jpeg() -> None:
    image = _halves("L", (32, 16), 0, 255)  # wide: black left, white right
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates 90 degrees clockwise
    pixels = decode_image(_jpeg(image, exif=exif)).pixels
    assert pixels.shape == (32, 16)  # now tall
    # The right half ends at the bottom after a clockwise turn.
    assert (pixels[:16].max(), pixels[16:].min()) == (0, 255)


def test_decode_converts_cmyk_jpeg_through_rgb() -> None:
    image = _halves("CMYK", (32, 16), (0, 0, 0, 0), (255, 0, 0, 0))  # white | cyan
    pixels = decode_image(_jpeg(image)).pixels
    # Cyan = RGB (0, 255, 255): luma 0.587 * 255 + 0.114 * 255 = 178.8 -> 179.
    assert (pixels[0, 0], pixels[0, 31]) == (255, 179)


def test_decode_rejects_frame_other_than_0_for_png() -> None:
    with pytest.raises(FrameOutOfRangeError):
        decode_image(_png(Image.new("L", (16, 16))), frame=1)


def test_decode_rejects_negative_frame() -> None:
    with pytest.raises(FrameOutOfRangeError):
        decode_image(_png(Image.new("L", (16, 16))), frame=-1)


# --- PNG / JPEG rejections -----------------------------------------------------------------------


def test_decode_rejects_1x1_png_as_too_small() -> None:
    with pytest.raises(ImageTooSmallError):
        decode_image(_png(Image.new("L", (1, 1))))


def test_decode_accepts_image_of_exactly_min_side() -> None:
    assert decode_image(_png(Image.new("L", (MIN_SIDE, MIN_SIDE)))).pixels.shape == (8, 8)


def test_decode_rejects_png_thinner_than_min_side() -> None:
    with pytest.raises(ImageTooSmallError):
        decode_image(_png(Image.new("L", (200, MIN_SIDE - 1))))


def test_decode_rejects_decompression_bomb_from_header_without_decoding() -> None:
    data = _png_header_only(20_000, 20_000)  # 400 Mpx declared in a ~100-byte file
    assert len(data) < 200
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data)
    assert str(DEFAULT_MAX_PIXELS) in info.value.message


def test_decode_enforces_max_pixels_exactly() -> None:
    data = _png(Image.new("L", (16, 8)))
    assert decode_image(data, max_pixels=128).pixels.shape == (8, 16)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=127)


def test_decode_ignores_pillow_global_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 px would be a "bomb" to Image.open
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(_png(Image.new("L", (8, 8), 3)))
    assert np.all(decoded.pixels == 3)


def test_decode_rejects_truncated_png() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _png(Image.fromarray(noise))
    with pytest.raises(CorruptImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.message == "The PNG image is truncated or corrupt."


def test_decode_rejects_truncated_jpeg() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _jpeg(Image.fromarray(noise))
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2])


def test_decode_rejects_png_with_broken_header() -> None:
    data = bytearray(_png(Image.new("L", (16, 16))))
    data[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
    with pytest.raises(CorruptImageError) as info:
        decode_image(bytes(data))
    assert info.value.message == "The PNG header is invalid."


def test_decode_refuses_to_run_when_pillow_accepts_truncated_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode_image(_png(Image.new("L", (16, 16))))


# --- DICOM, synthetic ----------------------------------------------------------------------------


def test_decode_applies_rescale_then_window_to_monochrome2_dicom() -> None:
    stored = np.zeros((8, 8), np.uint16)
    stored[0, :5] = [0, 440, 512, 600, 700]
    data = _dicom(stored, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    decoded = decode_image(data, declared_format="dicom")
    assert (decoded.format, decoded.frame, decoded.n_frames) == ("dicom", 0, 1)
    # value = 2 * stored - 1024, then PS3.3 C.11.2.1.2.1 LINEAR with c = 40, w = 400 on 0..255:
    # v <= -160 -> 0, v > 239 -> 255, else ((v - 39.5) / 399 + 0.5) * 255.
    # -144 -> 10.23, 0 -> 102.26, 176 -> 214.74
    np.testing.assert_array_equal(decoded.pixels[0, :5], [0, 10, 102, 215, 255])


def test_decode_stretches_min_max_of_dicom_without_window() -> None:
    stored = np.full((8, 8), 100, np.uint16)
    stored[0, :3] = [100, 150, 300]
    pixels = decode_image(_dicom(stored, bits_stored=12)).pixels
    # (v - 100) / 200 * 255: 150 -> 63.75
    np.testing.assert_array_equal(pixels[0, :3], [0, 64, 255])


def test_decode_inverts_monochrome1_dicom() -> None:
    # PS3.3 C.7.6.3.1.2: the lowest value displays white.
    stored = np.full((8, 8), 100, np.uint16)
    stored[0, :3] = [100, 150, 300]
    pixels = decode_image(_dicom(stored, "MONOCHROME1", bits_stored=12)).pixels
    np.testing.assert_array_equal(pixels[0, :3], [255, 191, 0])


def test_decode_inverts_monochrome1_dicom_after_its_window() -> None:
    stored = np.zeros((8, 8), np.uint16)
    stored[0, :2] = [0, 4095]
    pixels = decode_image(
        _dicom(stored, "MONOCHROME1", bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    ).pixels
    assert (pixels[0, 0], pixels[0, 1]) == (255, 0)


def test_decode_applies_voi_lut_over_window_and_scales_by_its_nominal_depth() -> None:
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries from 0, 16 bits
    item.add_new(0x00283006, "US", [100, 1000, 40000, 30000])  # LUT Data
    stored = np.zeros((8, 8), np.uint16)
    stored[0, :5] = [0, 1, 2, 3, 9]  # 9 is past the table: the last entry
    ds = _dicom_dataset(stored, bits_stored=12, WindowCenter=1, WindowWidth=2)
    ds.VOILUTSequence = [item]
    pixels = decode_image(_dicom_bytes(ds)).pixels
    # Output range 0..65535, not the table's min..max -> round(v / 257): 100 -> 0.39,
    # 1000 -> 3.89, 40000 -> 155.6, 30000 -> 116.7
    np.testing.assert_array_equal(pixels[0, :5], [0, 4, 156, 117, 117])


def test_decode_converts_signed_dicom_with_rescale() -> None:
    stored = np.zeros((8, 8), np.int16)
    stored[0, :3] = [-1000, 0, 1000]  # min-max after rescale: -2000 .. 2000
    pixels = decode_image(_dicom(stored, RescaleSlope=2, RescaleIntercept=0)).pixels
    np.testing.assert_array_equal(pixels[0, :3], [0, 128, 255])  # 0 -> 127.5 -> 128 (to even)


def test_decode_converts_rgb_dicom_with_bt601_luma() -> None:
    rgb = np.zeros((8, 24, 3), np.uint8)
    rgb[:, 0:8, 0] = rgb[:, 8:16, 1] = rgb[:, 16:24, 2] = 255
    pixels = decode_image(_dicom(rgb, "RGB")).pixels
    assert [pixels[0, 0], pixels[0, 8], pixels[0, 16]] == RED_GREEN_BLUE_LUMA


def test_decode_converts_ybr_full_dicom_to_rgb_once() -> None:
    ybr = np.zeros((8, 8, 3), np.uint8)
    ybr[...] = (100, 50, 200)
    pixels = decode_image(_dicom(ybr, "YBR_FULL")).pixels
    # YBR (100, 50, 200) -> RGB (201, 75, 0) -> luma 104; a second YBR->RGB would give about 168.
    assert np.all(pixels == 104)


def test_decode_selects_requested_frame_of_multiframe_dicom() -> None:
    cine = np.zeros((3, 8, 8), np.uint8)
    for index in range(3):
        cine[index, 0, index] = 200  # each frame has its bright pixel at a different column
    data = _dicom(cine)
    for index in range(3):
        decoded = decode_image(data, frame=index)
        assert (decoded.frame, decoded.n_frames) == (index, 3)
        assert np.argwhere(decoded.pixels == 255).tolist() == [[0, index]]


@pytest.mark.parametrize("frame", [3, 100, -1])
def test_decode_rejects_frame_out_of_range_in_multiframe_dicom(frame: int) -> None:
    with pytest.raises(FrameOutOfRangeError):
        decode_image(_dicom(np.zeros((3, 8, 8), np.uint8)), frame=frame)


def test_decode_rejects_dicom_text_report_as_no_pixel_data() -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = BasicTextSRStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Doe^Jane"
    with pytest.raises(NoPixelDataError) as info:
        decode_image(_dicom_bytes(ds))
    assert "Doe" not in info.value.message


def test_decode_rejects_dicom_rt_plan_as_no_pixel_data() -> None:
    with pytest.raises(NoPixelDataError):
        decode_image(_pydicom_test_file("rtplan.dcm"))


def test_decode_rejects_dicom_declaring_huge_rows_and_columns_before_decoding() -> None:
    ds = _dicom_dataset(np.zeros((8, 8), np.uint8), Rows=65535, Columns=65535)
    with pytest.raises(ImageTooLargeError):
        decode_image(_dicom_bytes(ds))


def test_decode_rejects_dicom_with_more_frames_than_the_cap() -> None:
    data = _dicom(np.zeros((3, 8, 8), np.uint8))
    assert decode_image(data, max_frames=3).n_frames == 3
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_frames=2)


def test_decode_rejects_tiny_dicom_as_too_small() -> None:
    with pytest.raises(ImageTooSmallError):
        decode_image(_dicom(np.zeros((MIN_SIDE - 1, 64), np.uint8)))


def test_decode_rejects_dicom_with_truncated_pixel_data() -> None:
    data = _dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    with pytest.raises(CorruptImageError) as info:
        decode_image(data[:-1000])
    assert info.value.message.startswith("The DICOM pixel data is truncated")


def test_decode_rejects_dicom_with_unsupported_transfer_syntax() -> None:
    ds = _dicom_dataset(np.zeros((8, 8), np.uint8))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\xfe\xff\x00\xe0\x04\x00\x00\x00abcd"
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(UnsupportedDicomError) as info:
        decode_image(_dicom_bytes(ds))
    assert info.value.message == "The DICOM transfer syntax is not supported."


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_decode_rejects_truncated_compressed_dicom_as_corrupt_not_as_report() -> None:
    data = _pydicom_test_file("examples_ybr_color.dcm")
    with pytest.raises(CorruptImageError) as info:
        decode_image(data[:-5000], frame=0)
    assert info.value.message == "The DICOM pixel data is missing or truncated."


def test_decode_rejects_dicom_frame_with_broken_codestream_but_reads_the_others() -> None:
    data = bytearray(_pydicom_test_file("examples_ybr_color.dcm"))
    first_soi = data.find(b"\xff\xd8\xff", 132)  # frame 0's JPEG starts here
    data[first_soi : first_soi + 3] = b"\x00\x00\x00"
    with pytest.raises(CorruptImageError) as info:
        decode_image(bytes(data), frame=0)
    assert info.value.message == "The DICOM pixel data cannot be decoded."
    assert decode_image(bytes(data), frame=1).pixels.shape == (240, 320)


def test_decode_error_messages_carry_no_dicom_values() -> None:
    ds = _dicom_dataset(np.zeros((8, 8), np.uint8), PatientName="Doe^Jane", Rows=77)
    with pytest.raises(CorruptImageError) as info:
        decode_image(_dicom_bytes(ds))
    assert "Doe" not in info.value.message and "77" not in info.value.message
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


# --- DICOM, pydicom's shipped files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("examples_ybr_color.dcm", (240, 320)),  # JPEG baseline, YBR_FULL_422, 30 frames
        ("examples_rgb_color.dcm", (240, 320)),
        ("examples_palette.dcm", (350, 800)),
        ("examples_jpeg2k.dcm", (480, 640)),  # JPEG 2000, YBR_RCT
        ("ExplVR_BigEnd.dcm", (60, 80)),
        ("MR_small_RLE.dcm", (64, 64)),
        ("JPEGLSNearLossless_16.dcm", (50, 10)),
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64)),
        ("SC_ybr_full_422_uncompressed.dcm", (100, 100)),
        ("SC_rgb_rle_16bit.dcm", (100, 100)),
        ("CT_small.dcm", (128, 128)),  # signed, with rescale
        ("JPEG2000.dcm", (1024, 256)),
    ],
)
def test_decode_reads_pydicom_test_file(name: str, shape: tuple[int, int]) -> None:
    decoded = decode_image(_pydicom_test_file(name), declared_format="dicom")
    assert isinstance(decoded, DecodedImage)
    assert decoded.pixels.shape == shape
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.flags.c_contiguous
    assert decoded.pixels.min() < decoded.pixels.max()


def test_decode_picks_one_frame_of_jpeg_cine() -> None:
    data = _pydicom_test_file("examples_ybr_color.dcm")
    first, last = decode_image(data, frame=0), decode_image(data, frame=29)
    assert (first.n_frames, last.frame) == (30, 29)
    assert not np.array_equal(first.pixels, last.pixels)
    with pytest.raises(FrameOutOfRangeError):
        decode_image(data, frame=30)


def test_decode_matches_luma_of_pydicom_rgb_for_uncompressed_rgb_file() -> None:
    data = _pydicom_test_file("examples_rgb_color.dcm")
    rgb = pydicom.dcmread(BytesIO(data)).pixel_array.astype(np.float64)
    expected = rgb @ np.array([0.299, 0.587, 0.114])
    difference = np.abs(decode_image(data).pixels - expected)
    assert difference.max() <= 0.5 + 1e-6  # nearest-integer rounding of the BT.601 sum


# --- DICOM header fields of the wrong type, multiplicity or value (issue 12) ----------------------


def _with_number_of_frames(raw_value: bytes) -> bytes:
    """A one-frame DICOM whose NumberOfFrames element holds `raw_value` as written on disk."""
    data = _dicom(np.zeros((16, 16), np.uint8), NumberOfFrames=1)
    if len(raw_value) % 2:
        raw_value += b" "
    old = b"\x28\x00\x08\x00IS\x02\x001 "
    assert old in data
    new = b"\x28\x00\x08\x00IS" + struct.pack("<H", len(raw_value)) + raw_value
    return data.replace(old, new)


@pytest.mark.parametrize("raw", [b"1A", b"abc", b"1\\2", b"-3", b"0"])
def test_decode_rejects_malformed_number_of_frames_as_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptImageError) as info:
        decode_image(_with_number_of_frames(raw))
    assert "NumberOfFrames" in info.value.message


def test_decode_rejects_pydicom_bad_vr_file_as_corrupt() -> None:
    with pytest.raises(CorruptImageError):
        decode_image(_pydicom_test_file("badVR.dcm"))


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"])
def test_decode_rejects_three_samples_with_a_one_sample_photometric(photometric: str) -> None:
    ds = _dicom_dataset(np.zeros((16, 16, 3), np.uint8), "RGB")
    ds.PhotometricInterpretation = photometric
    with pytest.raises(CorruptImageError, match="samples per pixel"):
        decode_image(_dicom_bytes(ds))


def test_decode_rejects_rgb_with_one_sample() -> None:
    ds = _dicom_dataset(np.zeros((16, 16), np.uint8))
    ds.PhotometricInterpretation = "RGB"
    with pytest.raises(CorruptImageError, match="samples per pixel"):
        decode_image(_dicom_bytes(ds))


@pytest.mark.parametrize(
    "elements",
    [
        {"RescaleSlope": "NaN", "RescaleIntercept": "0"},
        {"RescaleSlope": "inf", "RescaleIntercept": "0"},
        {"RescaleSlope": "1", "RescaleIntercept": "-inf"},
        {"RescaleSlope": "1e308", "RescaleIntercept": "0"},
        {"RescaleSlope": "0", "RescaleIntercept": "0"},
        {"WindowCenter": "NaN", "WindowWidth": "100"},
        {"WindowCenter": "100", "WindowWidth": "inf"},
        {"WindowCenter": "100", "WindowWidth": "1e300"},
        {"WindowCenter": "100", "WindowWidth": "0.5"},
    ],
)
def test_decode_refuses_non_finite_or_absurd_display_values(elements: dict[str, str]) -> None:
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    with pytest.raises(InvalidDicomValueError) as info:
        decode_image(_dicom(pixels, **elements))
    assert info.value.code == "invalid_dicom_value"
    assert any(keyword in info.value.message for keyword in elements)


def test_decode_rejects_a_file_declaring_more_frames_than_its_fragments() -> None:
    from pydicom.uid import RLELossless

    ds = _dicom_dataset(np.zeros((64, 64), np.uint8))
    ds.compress(RLELossless)
    ds.NumberOfFrames = 2000
    with pytest.raises(CorruptImageError, match="fewer frames than the 2000"):
        decode_image(_dicom_bytes(ds))


def test_decode_rejects_a_native_file_declaring_more_frames_than_its_bytes() -> None:
    ds = _dicom_dataset(np.zeros((64, 64), np.uint8), NumberOfFrames=3)
    with pytest.raises(CorruptImageError, match="fewer frames than the 3"):
        decode_image(_dicom_bytes(ds))


def test_decode_frame_out_of_range_says_how_many_frames() -> None:
    data = _dicom(np.zeros((4, 16, 16), np.uint8))
    with pytest.raises(FrameOutOfRangeError, match="this image has 4 frames"):
        decode_image(data, frame=4)


# --- memory caps: decoded bytes and aspect ratio (issue 12) ------------------------------------


def test_decode_counts_samples_and_bit_depth_against_the_byte_cap() -> None:
    rgb16 = _dicom(np.zeros((64, 64, 3), np.uint16), "RGB")  # 64 * 64 * 3 * 2 = 24576 bytes
    assert decode_image(rgb16, max_decoded_bytes=24576).pixels.shape == (64, 64)
    with pytest.raises(ImageTooLargeError, match="bytes decoded"):
        decode_image(rgb16, max_decoded_bytes=24575)


def test_decode_counts_png_bands_against_the_byte_cap() -> None:
    data = _png(Image.new("RGB", (64, 64)))  # held as 4 bytes per pixel by Pillow
    with pytest.raises(ImageTooLargeError, match="bytes decoded"):
        decode_image(data, max_decoded_bytes=64 * 64 * 4 - 1)


@pytest.mark.parametrize(("width", "height"), [(8, 1_000_000), (5_000_000, 8), (81, 8)])
def test_decode_refuses_thin_strips_from_the_header(width: int, height: int) -> None:
    with pytest.raises(ImageTooLargeError, match="times longer"):
        decode_image(_png_header_only(width, height))


def test_decode_accepts_an_aspect_ratio_of_exactly_the_cap() -> None:
    assert decode_image(_png(Image.new("L", (80, 8)))).pixels.shape == (8, 80)


def test_scale_to_uint8_in_blocks_equals_the_whole_frame_formula() -> None:
    from shared import decoding

    values = np.random.default_rng(0).integers(-3000, 3000, (3000, 1500)).astype(np.int16)
    whole = np.rint(np.clip((values.astype(np.float64) + 1000) * (255.0 / 2500), 0, 255))
    np.testing.assert_array_equal(decoding._scale_to_uint8(values, -1000, 1500), whole)
