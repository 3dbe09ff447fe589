"""A presentation state that draws our finding on the source image, for any viewer.

Viewers that show no DICOM SEG on ultrasound (OHIF among them) still apply a Softcopy
Presentation State (PS3.3 A.33): this one holds a graphic layer "AI" with each lesion region's
outline (a closed polyline in image pixels, the SR's SCOORD) and a text label with the finding and
its probability, on the analysed frame. A grayscale source gets a Grayscale Softcopy Presentation
State, which keeps the source's VOI window (and MONOCHROME1's inversion); a colour one (most
ultrasound, PALETTE COLOR included) a Color Softcopy Presentation State with an sRGB profile,
since PS3.4 N.2 applies grayscale states to grayscale images only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import highdicom as hd
from PIL import ImageCms

from service.dicom.header import ResultSource, restore_references
from service.dicom.outline import TrackedFinding

LAYER = "AI"
# CIELab of a saturated yellow: visible on grey and on colour-Doppler images alike.
_YELLOW = hd.color.CIELabColor(97.1, -21.6, 94.5)


@cache
def srgb_profile() -> bytes:
    """An sRGB ICC profile for the state's ICC Profile (PS3.3 C.11.15), in which colour
    ultrasound images are displayed.

    Little CMS makes it a display ("mntr") profile; PS3.3 C.11.15.1.1 wants an input ("scnr")
    or colour space ("spac") one, so its device class (ICC.1 7.2.5, bytes 12-15) is set to
    "spac" and its profile ID (7.2.18, bytes 84-99, an MD5 of the header) to zeros, "not
    computed", which the ID allows.
    """
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[12:16] = b"spac"
    profile[84:100] = bytes(16)
    return bytes(profile)


def build_presentation_state(
    source: ResultSource,
    regions: Sequence[TrackedFinding],
    *,
    label: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    manufacturer: str,
    model_name: str,
    software_version: str,
) -> hd.pr.GrayscaleSoftcopyPresentationState | hd.pr.ColorSoftcopyPresentationState:
    """The presentation state of one analysed frame: each region's outline (with its Tracking
    UID, the SR's) and `label`."""
    view = source.view
    rows, columns = int(view.Rows), int(view.Columns)
    graphics = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            # PS3.3 C.10.5.1.2: in PIXEL units the top-left pixel's top-left corner is 0\0, as
            # in the SR's SCOORD; the outline runs along pixel borders, so at most Columns\Rows.
            graphic_data=tracked.finding.outline,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=f"Lesion {number}",
            tracking_uid=tracked.uid,
        )
        for number, tracked in enumerate(regions, start=1)
    ]
    text = hd.pr.TextObject(
        text_value=label,
        units=hd.pr.AnnotationUnitsValues.PIXEL,
        bounding_box=_label_box(regions[0].finding.bbox if regions else None, rows, columns),
    )
    layer = hd.pr.GraphicLayer(
        layer_name=LAYER, order=1, description="AI findings", display_color=_YELLOW
    )
    annotation = hd.pr.GraphicAnnotation(
        referenced_images=[view],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=[text],
    )
    common = dict(
        referenced_images=[view],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=model_name,
        software_versions=software_version,
        device_serial_number="none",
        content_label="AI_FINDINGS",
        content_description="AI lesion outline and finding (research use, not for diagnosis)",
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        concept_name=None,
    )
    if source.grayscale:
        # PS3.3 C.11.6.1: MONOCHROME1 shows its lowest value as white, so its state's
        # Presentation LUT is INVERSE, or a viewer applying the state shows it inverted.
        shape = (
            hd.PresentationLUTShapeValues.INVERSE
            if view.PhotometricInterpretation == "MONOCHROME1"
            else hd.PresentationLUTShapeValues.IDENTITY
        )
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            **common,
            presentation_lut_transformation=hd.PresentationLUTTransformation(
                presentation_lut_shape=shape
            ),
        )
    else:
        state = hd.pr.ColorSoftcopyPresentationState(**common, icc_profile=srgb_profile())
    state.SeriesDescription = "AI findings overlay (research use, not for diagnosis)"
    # PS3.3 C.7.3.1: Type 2C for a paired body part (the breast); empty when the source does
    # not say which side.
    state.Laterality = view.Laterality
    restore_references(state, source)
    return state


_LABEL_SIZE = (240.0, 20.0)  # pixels: room for the label's text


def _label_box(
    bbox: tuple[int, int, int, int] | None, rows: int, columns: int
) -> tuple[float, float, float, float]:
    """The label's box (top-left x, y, bottom-right x, y): just above the largest region, or
    at the image's top-left without one; always inside the image."""
    width, height = min(_LABEL_SIZE[0], float(columns)), min(_LABEL_SIZE[1], float(rows))
    x, y = (float(bbox[0]), float(bbox[1]) - height) if bbox else (0.0, 0.0)
    x, y = min(max(x, 0.0), columns - width), min(max(y, 0.0), rows - height)
    return x, y, x + width, y + height
