"""The one place where a source's DICOM header becomes the attributes our results copy.

A PACS sends what its modalities wrote, and real archives hold every kind of header: Type 2
attributes (Patient ID, Patient's Name, Birth Date, Sex, Accession Number, Study ID, Study Date
and Time, PS3.3 C.7.1.1 and C.7.2.1) absent or present but empty, values invalid for their VR
(a Patient's Sex `FEMALE`, a date `2026-01-01`, two Patient's Names), text in any of the character
sets of PS3.3 C.12.1.1.2 or in one the header does not declare, and SOP classes that highdicom does
not know (the retired Ultrasound Image Storage, private classes). highdicom reads the source's
attributes without checking them, so what it is given decides whether a result is valid.

`ResultSource` is what results are made from: a fresh dataset with only the attributes they
copy, each one checked against its VR (PS3.5 6.2) and dropped (Type 3) or written empty (Type 2)
when invalid, never copied invalid; text decoded as the source's Specific Character Set defines
it and written as UTF-8 (ISO_IR 192) when it is not plain ASCII; the source shown to highdicom
as a single-frame Secondary Capture image, a class it knows, whose references are then given
back the source's real SOP class (and frame) by `restore_references`. Only what no result can do
without raises: the UIDs every reference needs (UnreferenceableDicomError) and Modality US
(NotUltrasoundError), each a 422 with the reason, or a per-instance failure in STOW-RS.

Nothing here logs a value: these are patient data.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import format_number_as_ds

from shared.errors import InputError, NotUltrasoundError

SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
UTF8 = "ISO_IR 192"
ULTRASOUND = "US"

# PS3.3 A.1.4: the multi-frame image IODs, whose frames are referenced by number.
_MULTIFRAME_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (retired)
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
}

# PS3.5 6.2: the longest value of each VR we copy (characters), and the characters PN, LO and SH
# may not hold (the backslash separates values; control characters other than ESC are not text).
_MAX_CHARS = {"LO": 64, "SH": 16, "PN": 64}
_CONTROL = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f\\]")
_DATE = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TIME = re.compile(r"^([01]\d|2[0-3])(?:([0-5]\d)(?:([0-5]\d|60)(?:\.\d{1,6})?)?)?$")
_ORIENTATION = re.compile(r"^[APLRHF]+$")
_SEXES = {"M", "F", "O"}
_GREY = ("MONOCHROME1", "MONOCHROME2")  # PS3.3 C.7.1.1: the defined terms

# (keyword, VR, Type): the patient and study attributes results copy (PS3.3 C.7.1.1, C.7.2.1).
# Type 2 ones are always written, empty when the source has none or an invalid one.
_TEXT_ATTRIBUTES = (
    ("PatientName", "PN", 2),
    ("PatientID", "LO", 2),
    ("IssuerOfPatientID", "LO", 3),
    ("ReferringPhysicianName", "PN", 2),
    ("StudyID", "SH", 2),
    ("AccessionNumber", "SH", 2),
    ("StudyDescription", "LO", 3),
)
_REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class UnreferenceableDicomError(InputError):
    """The source DICOM lacks an identifier (study, series, instance UID) results must cite."""

    code = "dicom_not_referenceable"


@dataclass(frozen=True)
class ResultSource:
    """What results of one analysed frame are made from: `view`, the sanitised header that
    highdicom reads (a single-frame Secondary Capture image), and the source's real identity."""

    view: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    frame: int  # 0-based
    n_frames: int
    pixel_spacing_mm: tuple[float, float] | None  # (row, column)

    @property
    def multiframe(self) -> bool:
        """Whether the source's frames are referenced by number: a multi-frame IOD, or any
        object with more than one frame (PS3.3 C.10.3)."""
        return self.n_frames > 1 or self.sop_class_uid in _MULTIFRAME_CLASSES

    @property
    def frame_numbers(self) -> list[int] | None:
        """The 1-based Referenced Frame Number of the analysed frame; None for a single-frame
        object, which is referenced whole."""
        return [self.frame + 1] if self.multiframe else None

    @property
    def grayscale(self) -> bool:
        return int(self.view.SamplesPerPixel) == 1


def result_source(
    header: Dataset, frame: int, n_frames: int, *, require_ultrasound: bool = True
) -> ResultSource:
    """The sanitised source of results for `frame` (0-based) of a decoded DICOM's header.

    Raises UnreferenceableDicomError when a UID every reference needs (study, series, SOP
    instance, SOP class), Rows or Columns is missing or invalid, and, with `require_ultrasound`
    (unless the operator allows other modalities), NotUltrasoundError when the header does not
    say it is ultrasound (Modality US).
    """
    uids = {name: _uid(header, name) for name in _REFERENCED_UIDS}
    missing = [name for name, value in uids.items() if value is None]
    rows, columns = _positive_int(header, "Rows"), _positive_int(header, "Columns")
    missing += [name for name, v in (("Rows", rows), ("Columns", columns)) if v is None]
    if missing:
        raise UnreferenceableDicomError(
            "DICOM results must reference the source, which lacks a valid " + ", ".join(missing)
        )
    modality = _text(header, "Modality")
    if require_ultrasound and (modality or "").strip().upper() != ULTRASOUND:
        # The JSON answer may still be asked for; a result filed in the study would claim an
        # ultrasound analysis of an object that does not say it is one.
        raise NotUltrasoundError(
            "DICOM results are made for ultrasound images only, and the source's Modality is "
            + ("missing" if not modality else "not US")
        )
    view = Dataset()
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(view, name, uids[name])
    view.SOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    view.Modality = ULTRASOUND  # highdicom reads it; our results have their own
    view.Rows, view.Columns = rows, columns
    # How the source is displayed, which is what a presentation state applies to (PS3.4 N.2):
    # grey (MONOCHROME1 keeps its inversion), else colour, PALETTE COLOR included.
    photometric = (_text(header, "PhotometricInterpretation") or "").strip().upper()
    samples = _positive_int(header, "SamplesPerPixel")
    grey = photometric in _GREY or (not photometric and samples in (None, 1))
    view.SamplesPerPixel = 1 if grey else 3
    view.PhotometricInterpretation = (
        (photometric if photometric in _GREY else "MONOCHROME2") if grey else "RGB"
    )
    view.BitsAllocated = 8
    encodings = _encodings(header)
    for name, vr, kind in _TEXT_ATTRIBUTES:
        value = _checked_text(header, name, vr, encodings)
        if value is not None or kind == 2:
            setattr(view, name, value or "")
    view.PatientBirthDate = _date(header, "PatientBirthDate")
    view.StudyDate = _date(header, "StudyDate")
    view.StudyTime = _time(header, "StudyTime")
    sex = (_text(header, "PatientSex") or "").strip()
    view.PatientSex = sex if sex in _SEXES else ""
    view.PatientOrientation = _orientation(header)
    laterality = (_text(header, "Laterality") or "").strip()
    view.Laterality = laterality if laterality in ("R", "L") else ""
    spacing = _pixel_spacing(header)
    if spacing is not None:
        view.PixelSpacing = [format_number_as_ds(v) for v in spacing]
    window = _window(header)
    if window is not None:
        view.WindowCenter, view.WindowWidth = (format_number_as_ds(v) for v in window)
    if any(_non_ascii(view.get(name, "")) for name, _, _ in _TEXT_ATTRIBUTES):
        view.SpecificCharacterSet = UTF8
    return ResultSource(
        view=view,
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        frame=frame,
        n_frames=max(1, n_frames),
        pixel_spacing_mm=spacing,
    )


# Sequences whose items use the SOP Instance Reference Macro (PS3.3 10.8), which has no frame
# number: the instance lists of the Common Instance Reference module and of the SR's evidence.
_WHOLE_INSTANCE_SEQUENCES = {
    "ReferencedInstanceSequence",
    "CurrentRequestedProcedureEvidenceSequence",
    "PertinentOtherEvidenceSequence",
}


def restore_references(result: Dataset, source: ResultSource) -> None:
    """Give every reference to the source, anywhere in `result`, the source's real SOP class
    and, for a multi-frame source, the analysed frame's number where the reference is an Image
    SOP Instance Reference (PS3.3 C.10.3; not in the instance lists of 10.8)."""
    _unshare_instance_lists(result)
    for item, whole_instance in _items(result, False):
        if item.get("ReferencedSOPInstanceUID") != source.sop_instance_uid:
            continue
        if "ReferencedSOPClassUID" in item:
            item.ReferencedSOPClassUID = source.sop_class_uid
        if (
            source.multiframe
            and not whole_instance
            and "ReferencedSegmentNumber" not in item
            and "ReferencedFrameNumber" not in item
        ):
            item.ReferencedFrameNumber = source.frame + 1


def _unshare_instance_lists(ds: Dataset) -> None:
    """Give the instance lists items of their own: highdicom puts one item object both there
    and in the SEG's Source Image Sequence, where the frame number belongs."""
    for element in ds:
        if element.VR != "SQ":
            continue
        if element.keyword in _WHOLE_INSTANCE_SEQUENCES:
            element.value = [copy.deepcopy(item) for item in element.value or []]
        for item in element.value or []:
            _unshare_instance_lists(item)


def _items(ds: Dataset, whole_instance: bool) -> Iterator[tuple[Dataset, bool]]:
    """Every item of every sequence below `ds`, and whether it lies in an instance list."""
    for element in ds:
        if element.VR == "SQ":
            inside = whole_instance or element.keyword in _WHOLE_INSTANCE_SEQUENCES
            for item in element.value or []:
                yield item, inside
                yield from _items(item, inside)


# --- reading one attribute ---------------------------------------------------------------------


def _value(header: Dataset, name: str) -> object:
    """The element's value, or None where it is absent or pydicom cannot convert it."""
    try:
        element = header.get(name)
    except Exception:  # pydicom's conversion errors; their messages may quote the value
        return None
    return element


def _text(header: Dataset, name: str) -> str | None:
    value = _value(header, name)
    if value is None or isinstance(value, MultiValue | list | bytes):
        return None
    return str(value)


def _uid(header: Dataset, name: str) -> str | None:
    value = _text(header, name)
    if not value:
        return None
    value = value.strip("\x00 ")
    return value if UID(value).is_valid else None


def _positive_int(header: Dataset, name: str) -> int | None:
    value = _value(header, name)
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _date(header: Dataset, name: str) -> str:
    """A valid DA (YYYYMMDD, a real date) or empty."""
    value = (_text(header, name) or "").strip()
    match = _DATE.match(value)
    if not match:
        return ""
    try:
        date(*(int(part) for part in match.groups()))
    except ValueError:
        return ""
    return value


def _time(header: Dataset, name: str) -> str:
    """A valid TM (HH, HHMM, HHMMSS or HHMMSS.FFFFFF) or empty."""
    value = (_text(header, name) or "").strip()
    return value if _TIME.match(value) else ""


def _orientation(header: Dataset) -> list[str] | str:
    """Patient Orientation (two CS values of A, P, L, R, H, F) or empty."""
    value = _value(header, "PatientOrientation")
    values = list(value) if isinstance(value, MultiValue | list) else []
    if len(values) == 2 and all(_ORIENTATION.match(str(v)) for v in values):
        return [str(v) for v in values]
    return ""


def _numbers(header: Dataset, name: str, count: int) -> tuple[float, ...] | None:
    value = _value(header, name)
    values = list(value) if isinstance(value, MultiValue | list) else [value]
    if len(values) < count:
        return None
    try:
        numbers = tuple(float(v) for v in values[:count])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _pixel_spacing(header: Dataset) -> tuple[float, float] | None:
    """(row, column) Pixel Spacing in mm, both positive; None when absent or unusable."""
    value = _value(header, "PixelSpacing")
    if not isinstance(value, MultiValue | list) or len(value) != 2:
        return None
    numbers = _numbers(header, "PixelSpacing", 2)
    if numbers is None or not all(0 < n < 1e4 for n in numbers):
        return None
    return numbers[0], numbers[1]


def _window(header: Dataset) -> tuple[float, float] | None:
    """The source's first VOI window (center, width >= 1), which a presentation state keeps."""
    center, width = _numbers(header, "WindowCenter", 1), _numbers(header, "WindowWidth", 1)
    if center is None or width is None or width[0] < 1:
        return None
    if max(abs(center[0]), width[0]) >= 1e9:
        return None
    return center[0], width[0]


def _non_ascii(value: object) -> bool:
    return any(ord(c) > 127 for c in str(value))


# --- text in the source's character set ---------------------------------------------------------


def _encodings(header: Dataset) -> list[str] | None:
    """The Python encodings of the source's Specific Character Set; None where pydicom knows
    none of them (then only bytes that are valid ASCII are text we can read)."""
    value = _value(header, "SpecificCharacterSet")
    terms = [value] if isinstance(value, str) else list(value or [])  # type: ignore[call-overload]
    terms = [str(t).strip() for t in terms] or [""]
    try:
        return convert_encodings(terms)
    except Exception:  # an unknown term, with pydicom's validation raising
        return None


def _checked_text(header: Dataset, name: str, vr: str, encodings: list[str] | None) -> str | None:
    """The attribute decoded from the source's bytes as its character set defines them, when
    it is one valid value of `vr`; None when absent or invalid (PS3.5 6.2)."""
    text = _decoded(header, name, encodings)
    if text is None:
        return None
    text = text.rstrip(" \x00")
    if not vr == "PN":
        text = text.lstrip(" ")
    if _CONTROL.search(text):  # a second value, or bytes that are no text
        return None
    if vr == "PN":
        groups = text.split("=")
        if len(groups) > 3 or any(len(g) > _MAX_CHARS["PN"] or g.count("^") > 4 for g in groups):
            return None
        return text
    return text if len(text) <= _MAX_CHARS[vr] else None


def _decoded(header: Dataset, name: str, encodings: list[str] | None) -> str | None:
    """The value as text, decoded strictly: bytes invalid in the declared character set are
    read as ISO 8859-1 (the single-byte set such headers almost always hold) when they contain
    no ISO 2022 escape; never with replacement characters."""
    try:
        element = header.get_item(name)
    except Exception:
        return None
    if element is None:
        return None
    if not isinstance(element, RawDataElement):  # already converted by pydicom
        value = element.value
        if value is None or isinstance(value, MultiValue | list | bytes):
            return None
        text = str(value)
        return None if "\ufffd" in text else text
    raw = element.value
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw
    if encodings is None:
        return raw.decode("ascii") if raw.isascii() else None
    try:
        text = _strict_decode(raw, encodings)
    except (UnicodeError, LookupError, ValueError):
        text = None
    if text is None:
        if b"\x1b" in raw:
            return None
        return raw.decode("latin-1")
    return text


def _strict_decode(raw: bytes, encodings: list[str]) -> str | None:
    """`raw` decoded with the first encoding, or with ISO 2022 escapes switching among them
    (pydicom's decoder); None where that needs replacement characters."""
    if b"\x1b" not in raw:
        return raw.decode(encodings[0], errors="strict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = decode_bytes(raw, encodings, {0x5C, 0x3D, 0x5E})  # PN delimiters: \ = ^
    return None if "\ufffd" in text and b"\xef\xbf\xbd" not in raw else text
