"""What a DICOM header already says about whether the object is a scan these models can read.

The models were trained on breast-ultrasound B-mode images. A DICOM object says what it is in
its header: Modality (0008,0060) names the acquisition (US for ultrasound), and the SOP Class UID
(0008,0016) names the kind of object; segmentations, structured reports and radiotherapy objects
are not images to classify even when some of them carry pixel data (a SEG's bitmap, an RT dose
grid). Both are read from the header alone, before any pixel is decoded or any model runs.
"""

from __future__ import annotations

from shared.decoding import read_dicom_header
from shared.errors import NonImageDicomError, NotUltrasoundError

ULTRASOUND_MODALITY = "US"

# PS3.4 B.5 / PS3.6 A: storage SOP classes whose objects are not images to classify.
_NON_IMAGE_SOP_PREFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.66.": "a segmentation or registration object",  # SEG, REG, ...
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report",  # SR, KOS, CAD SR, ...
    "1.2.840.10008.5.1.4.1.1.481.": "a radiotherapy object",  # RT Image, Dose, Plan, Struct
    "1.2.840.10008.5.1.4.1.1.9.": "a waveform",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
}


def check_ultrasound_image(data: bytes) -> None:
    """Refuse a DICOM PS3.10 file whose header says it is no ultrasound image.

    A header that cannot be read, or that lacks Modality or SOP Class UID, is let through: the
    decoder then reports what is wrong with it. Raises NonImageDicomError for a non-image SOP
    class and NotUltrasoundError for a Modality other than US.
    """
    ds = read_dicom_header(data, ("SOPClassUID", "Modality"))
    if ds is None:  # malformed headers are the decoder's to report, with its own codes
        return
    try:
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
        modality = str(ds.get("Modality") or "").strip().upper()
    except Exception:  # so are values pydicom cannot convert
        return
    for prefix, kind in _NON_IMAGE_SOP_PREFIXES.items():
        if sop_class.startswith(prefix):
            raise NonImageDicomError(
                f"The DICOM object is {kind}, not an image; send an ultrasound image."
            )
    if modality and modality != ULTRASOUND_MODALITY:
        raise NotUltrasoundError(
            "The DICOM image is not ultrasound (its Modality is not US); the models only read "
            "breast-ultrasound scans."
        )
