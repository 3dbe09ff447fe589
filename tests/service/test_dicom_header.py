"""service.dicom: the header sanitiser's rules one by one, and lesion outlines."""

from __future__ import annotations

import io

import numpy as np
import pytest
from dicom_support import pacs_dicom
from pydicom import Dataset, dcmread
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from service.dicom.header import (
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    UnreferenceableDicomError,
    restore_references,
    result_source,
)
from service.dicom.outline import findings
from shared.errors import NotUltrasoundError


def source_header(**changes: object) -> Dataset:
    ds = dcmread(io.BytesIO(pacs_dicom()), stop_before_pixels=True)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> Dataset:
    """The element as a file holds it, not yet converted by pydicom."""
    tag = Tag(keyword)
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def test_the_view_is_a_secondary_capture_image_and_references_get_the_real_class_back() -> None:
    header = source_header(NumberOfFrames=3)
    source = result_source(header, frame=1, n_frames=3)
    assert source.view.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
    result = Dataset()
    item = Dataset()
    item.ReferencedSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    result.ReferencedImageSequence = [item]
    restore_references(result, source)
    assert item.ReferencedSOPClassUID == header.SOPClassUID
    assert item.ReferencedFrameNumber == 2


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientSex", "U"),
        ("PatientSex", "FEMALE"),
        ("PatientBirthDate", "2026-01-01"),
        ("StudyDate", "20260230"),
        ("StudyTime", "246000"),
        ("PatientID", "X" * 65),
        ("AccessionNumber", "A" * 17),
    ],
)
def test_an_invalid_type_2_value_is_written_empty(keyword: str, value: str) -> None:
    header = raw(source_header(), keyword, "LO", value.encode())
    assert result_source(header, 0, 1).view[keyword].value in ("", None)


@pytest.mark.parametrize("keyword", ["PatientID", "PatientName", "StudyDate", "StudyID"])
def test_an_absent_type_2_attribute_is_written_empty(keyword: str) -> None:
    view = result_source(source_header(**{keyword: None}), 0, 1).view
    assert keyword in view and view[keyword].value in ("", None)


def test_valid_values_are_kept() -> None:
    header = source_header(PatientSex="F", PatientBirthDate="19800101", StudyTime="101010.5")
    view = result_source(header, 0, 1).view
    assert (view.PatientSex, view.PatientBirthDate, view.StudyTime) == ("F", "19800101", "101010.5")
    assert view.PatientID == header.PatientID
    assert "SpecificCharacterSet" not in view  # plain ASCII: the default repertoire


@pytest.mark.parametrize(
    "spacing", [b"0.2", b"abc\\0.2", b"NaN\\NaN", b"0\\0.1", b"-1\\-1", b"0.1\\0.1\\0.1"]
)
def test_unusable_pixel_spacing_is_dropped(spacing: bytes) -> None:
    source = result_source(raw(source_header(), "PixelSpacing", "DS", spacing), 0, 1)
    assert source.pixel_spacing_mm is None and "PixelSpacing" not in source.view


def test_a_name_declared_utf8_but_stored_latin1_is_read_as_latin1() -> None:
    header = raw(
        source_header(SpecificCharacterSet="ISO_IR 192"), "PatientName", "PN", b"M\xfcller"
    )
    view = result_source(header, 0, 1).view
    assert str(view.PatientName) == "Müller"
    assert view.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"Modality": None}, NotUltrasoundError),
        ({"Modality": "MR"}, NotUltrasoundError),
        ({"StudyInstanceUID": None}, UnreferenceableDicomError),
        ({"SOPInstanceUID": "1.2.x"}, UnreferenceableDicomError),
        ({"Rows": None}, UnreferenceableDicomError),
    ],
)
def test_what_no_result_can_do_without_is_a_clear_error(changes: dict, error: type) -> None:
    with pytest.raises(error):
        result_source(source_header(**changes), 0, 1)


def test_a_rectangle_is_outlined_along_its_pixel_borders() -> None:
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[2:5, 3:9] = 255
    (finding,) = findings(mask)
    assert finding.pixels == 18 and finding.bbox == (3, 2, 6, 3)
    assert finding.outline.tolist() == [[3, 2], [9, 2], [9, 5], [3, 5], [3, 2]]


def test_regions_touching_at_a_corner_are_one_finding_and_the_largest_comes_first() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:3, 1:3] = True
    mask[3:5, 3:5] = True  # touches the first square at one corner: 8-connected
    mask[7:10, 6:10] = True  # a separate, larger region
    first, second = findings(mask)
    assert (first.pixels, second.pixels) == (12, 8)
    points = {tuple(p) for p in second.outline.tolist()}
    assert {(1, 1), (5, 5)} <= points  # the outline goes round both squares


def test_a_hole_is_inside_the_outline_and_specks_are_not_findings() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False
    mask[7, 7] = True  # one pixel
    (finding,) = findings(mask)
    assert finding.pixels == 24
    assert finding.outline.tolist() == [[1, 1], [6, 1], [6, 6], [1, 6], [1, 1]]


def test_findings_are_the_8_connected_regions_and_outlines_span_each_one() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(7)
    for _ in range(200):
        mask = rng.random((12, 15)) < rng.uniform(0.1, 0.7)
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = sorted((int(n) for n in np.bincount(labels.ravel())[1:] if n >= 4), reverse=True)
        found = findings(mask)
        assert [f.pixels for f in found] == sizes[:10]
        for finding in found:
            x, y, width, height = finding.bbox
            outline = finding.outline
            assert (outline[0] == outline[-1]).all()
            assert (outline[:, 0].min(), outline[:, 0].max()) == (x, x + width)
            assert (outline[:, 1].min(), outline[:, 1].max()) == (y, y + height)
