"""Helpers for the DICOM-results tests: referenceable ultrasound DICOMs, multipart, dciodvfy.

service_inputs.dicom() makes the pixels; a PACS object also has a study and a series, which
`pacs_dicom` adds (with Pixel Spacing when asked), so results can reference them.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid
from service_inputs import dicom

from service.dicom.multipart import split_multipart
from service.media_types import parse_media_type

US_MULTIFRAME_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"
GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
CSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.2"
# What dciodvfy names the IOD of each of our results, by SOP class.
IOD_OF_CLASS = {
    SEG_STORAGE: "Segmentation",
    COMPREHENSIVE_SR_STORAGE: "ComprehensiveSR",
    GSPS_STORAGE: "GrayscaleSoftcopyPresentationState",
    CSPS_STORAGE: "ColorSoftcopyPresentationState",
}
DCIODVFY = Path(sys.executable).parent / "dciodvfy"

# pydicom's own ultrasound test files: single-frame colour, JPEG-2000, cine loop in JPEG baseline
PYDICOM_US_FILES = ("examples_rgb_color.dcm", "examples_jpeg2k.dcm", "examples_ybr_color.dcm")


def pacs_dicom(
    frames: list[np.ndarray] | np.ndarray | None = None,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    study_uid: str | None = None,
) -> bytes:
    """service_inputs.dicom() with the study and series a PACS object has."""
    ds = dcmread(io.BytesIO(dicom(frames)))
    if "NumberOfFrames" in ds:  # a cine loop is stored as Ultrasound Multi-frame Image
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME_STORAGE
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if pixel_spacing:
        ds.PixelSpacing = list(pixel_spacing)
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def header(data: bytes) -> Dataset:
    return dcmread(io.BytesIO(data), stop_before_pixels=True)


def read_parts(content_type: str, body: bytes) -> list[Dataset]:
    """The DICOM datasets of a multipart/related response."""
    media_type = parse_media_type(content_type)
    params = media_type.params
    assert media_type.essence == "multipart/related"
    assert params["type"] == "application/dicom"
    return [dcmread(io.BytesIO(p.data)) for p in split_multipart(body, params["boundary"])]


def seg_mask(seg: Dataset, source: Dataset, frame: int) -> np.ndarray:
    """The SEG's segment 1 on `frame` (0-based) of `source`, decoded by highdicom.

    highdicom 0.28 writes a source's Pixel Spacing into the SEG's Pixel Measures without a Slice
    Thickness (a 2D ultrasound frame has none) but its reader insists on one, so the reader gets
    a copy without Pixel Measures; the pixels are untouched.
    """
    seg = copy.deepcopy(seg)
    shared = seg.SharedFunctionalGroupsSequence[0]
    if (
        "PixelMeasuresSequence" in shared
        and "SliceThickness" not in shared.PixelMeasuresSequence[0]
    ):
        del shared.PixelMeasuresSequence
    seg = hd.seg.Segmentation.from_dataset(seg)
    if "NumberOfFrames" in source:
        pixels = seg.get_pixels_by_source_frame(
            source.SOPInstanceUID, source_frame_numbers=[frame + 1], segment_numbers=[1]
        )
    else:
        pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID], segment_numbers=[1])
    return pixels[0, :, :, 0].astype(bool)


def multipart_body(parts: list[bytes], boundary: str = "stow-test-boundary") -> tuple[bytes, str]:
    chunks = []
    for part in parts:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part]
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'


def dciodvfy_errors(data: bytes, tmp_path: Path, name: str, iod: str) -> list[str]:
    """The Error lines dciodvfy prints for the object (warnings are not errors), after checking
    that it recognised the object as the IOD `iod` (e.g. "Segmentation", "ComprehensiveSR")."""
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(data)
    run = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert iod in output.splitlines(), output
    return [line for line in output.splitlines() if line.startswith("Error")]
