"""DICOM objects whose header says they are not ultrasound images are refused before decoding."""

from __future__ import annotations

import io

import pytest
from pydicom import dcmread
from service_inputs import dicom

from shared.dicom_policy import check_ultrasound_image
from shared.errors import NonImageDicomError, NotUltrasoundError

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def rewritten(data: bytes, **tags: str) -> bytes:
    ds = dcmread(io.BytesIO(data))
    for name, value in tags.items():
        setattr(ds, name, value)
        if name == "SOPClassUID":
            ds.file_meta.MediaStorageSOPClassUID = value
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_ultrasound_image_passes():
    check_ultrasound_image(dicom())


def test_missing_modality_passes():
    ds = dcmread(io.BytesIO(dicom()))
    del ds.Modality
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    check_ultrasound_image(out.getvalue())


def test_ct_image_is_not_ultrasound():
    with pytest.raises(NotUltrasoundError):
        check_ultrasound_image(rewritten(dicom(), Modality="CT", SOPClassUID=CT_IMAGE_STORAGE))


@pytest.mark.parametrize("sop_class", [SEG_STORAGE, RT_DOSE_STORAGE])
def test_segmentation_and_rt_objects_are_non_image_even_with_pixels(sop_class):
    # a SEG or RT object wrongly labelled US is still refused by its SOP class
    with pytest.raises(NonImageDicomError):
        check_ultrasound_image(rewritten(dicom(), SOPClassUID=sop_class))


def test_structured_report_is_non_image():
    with pytest.raises(NonImageDicomError):
        check_ultrasound_image(dicom(with_pixels=False))


def test_unreadable_header_is_left_to_the_decoder():
    check_ultrasound_image(b"\0" * 128 + b"DICM" + b"\xff" * 20)
