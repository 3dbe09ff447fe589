"""The one response layer: raw results (`Analysis`) -> JSON, a PNG mask, a SEG, a SEG + SR +
presentation state, or a FHIR DiagnosticReport.

Each endpoint offers a list of representations, its default (JSON) first; the request's `Accept`
header picks one (RFC 9110 12.5.1, q-values honoured) before any model runs, so a DICOM answer
asked of a PNG or JPEG input is refused with 406 without work. The chosen encoder then turns the
predictor's `Analysis` into the response. A new output format is one encoder and one `Offer`.

Negotiation rules:

- Each offer is weighed by the most specific Accept range that matches it (`type/subtype` with
  matching parameters, then `type/subtype`, `type/*`, `*/*`); a parameter the offer does not
  define (e.g. DICOMweb's `transfer-syntax`) is ignored, one it defines must agree (a
  `multipart/related` range with `type="application/dicom+xml"` does not match).
- The highest q wins; among equal q, the range the client listed first, then the endpoint's
  order (JSON first, so `*/*` and `application/*` get JSON).
- DICOM offers are left out for a PNG or JPEG input (bytes of no known format are left to the
  decoder, which answers 415); when that leaves nothing acceptable but a
  DICOM offer was, the answer is 406 (`dicom_output_needs_dicom_input`).
- When nothing offered is acceptable (`Accept: text/html`), the answer is the default JSON, as
  RFC 9110 allows, rather than a 406.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image

from service import tracing
from service.dicom.builders import (
    DICOM_MEDIA_TYPE,
    NEEDS_DICOM_MESSAGE,
    DicomOutputNeedsDicomInputError,
    to_bytes,
)
from service.dicom.fhir import FHIR_MEDIA_TYPE
from service.dicom.multipart import multipart_related
from service.dicom.results import MULTIPART_DICOM, DicomResults, get_dicom_results
from service.media_types import MediaRange, MediaType, parse_accept, parse_media_type
from service.predictors import Analysis, Classification, ImageFacts, ImageRequest, Segmentation
from service.registry import LoadedModel
from service.schemas import (
    BBox,
    Cine,
    CineFrame,
    ClassificationResult,
    ClassifyResponse,
    DiagnoseResponse,
    DicomSource,
    ImageInfo,
    ModelRef,
    Quality,
    SegmentationResult,
    SegmentResponse,
)
from shared.decoding import sniff_format

JSON_MEDIA_TYPE = "application/json"
PNG_MEDIA_TYPE = "image/png"
_VARY = {"Vary": "Accept"}


# --- encoders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    """What an encoder needs beside the analysis."""

    request_id: str
    dicom: DicomResults
    include_image: bool = False


Encoder = Callable[[Analysis, Context], Response]


def encode_png(pixels: np.ndarray) -> bytes:
    """A (H, W) uint8 array as a one-channel PNG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _base64_png(pixels: np.ndarray) -> str:
    return base64.b64encode(encode_png(pixels)).decode("ascii")


def _model_ref(model: LoadedModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version)


def _image_info(facts: ImageFacts) -> ImageInfo:
    return ImageInfo(
        format=facts.format,
        width=facts.width,
        height=facts.height,
        frame=facts.frame,
        n_frames=facts.n_frames,
    )


def _quality(facts: ImageFacts) -> Quality:
    quality = facts.quality
    return Quality(
        in_distribution=quality.in_distribution,
        score=quality.score,
        reasons=list(quality.reasons),
    )


def _uid(value: Any) -> str | None:
    return str(value) if value else None


def _source(facts: ImageFacts) -> DicomSource | None:
    header = facts.dicom
    if header is None:
        return None
    try:
        uids = [
            _uid(header.get(name))
            for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
        ]
    except Exception:  # an element pydicom cannot convert: the pixels decoded, so answer
        uids = [None] * 4
    return DicomSource(
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
        sop_instance_uid=uids[2],
        sop_class_uid=uids[3],
        frame=facts.frame,
    )


def _cine(analysis: Analysis) -> Cine | None:
    if analysis.frames is None:
        return None
    frames = []
    for result in analysis.frames:
        classification = result.classification
        frames.append(
            CineFrame(
                frame=result.frame,
                label=classification.label if classification else None,
                probabilities=classification.probabilities if classification else None,
                lesion_area_fraction=result.lesion_area_fraction,
            )
        )
    return Cine(
        frames=frames,
        largest_lesion_frame=analysis.largest_lesion_frame,
        key_frame=analysis.image.frame,
    )


def _common(analysis: Analysis, context: Context) -> dict[str, Any]:
    """The fields every inference answer has about the image and the request."""
    facts = analysis.image
    return {
        "image": _image_info(facts),
        "quality": _quality(facts),
        "source": _source(facts),
        "cine": _cine(analysis),
        "request_id": context.request_id,
    }


def _classification(result: Classification) -> dict[str, Any]:
    return {
        "label": result.label,
        "probabilities": result.probabilities,
        "calibrated": result.calibrated,
        "uncertain": result.uncertain,
        "reliable": result.reliable,
        "model": _model_ref(result.model),
    }


def _segmentation(result: Segmentation) -> dict[str, Any]:
    bbox = result.bbox
    return {
        "mask_png": _base64_png(result.mask),
        "lesion_area_fraction": result.lesion_area_fraction,
        "bbox": BBox(x=bbox[0], y=bbox[1], width=bbox[2], height=bbox[3]) if bbox else None,
        "model": _model_ref(result.model),
    }


def _json(model: Any) -> Response:
    return JSONResponse(model.model_dump(mode="json"), headers=_VARY)


def classify_json(analysis: Analysis, context: Context) -> Response:
    assert analysis.classification is not None
    return _json(
        ClassifyResponse(**_classification(analysis.classification), **_common(analysis, context))
    )


def segment_json(analysis: Analysis, context: Context) -> Response:
    assert analysis.segmentation is not None
    return _json(
        SegmentResponse(**_segmentation(analysis.segmentation), **_common(analysis, context))
    )


def diagnose_json(analysis: Analysis, context: Context) -> Response:
    assert analysis.classification is not None
    segmentation = analysis.segmentation
    return _json(
        DiagnoseResponse(
            classification=ClassificationResult(**_classification(analysis.classification)),
            segmentation=(
                SegmentationResult(**_segmentation(segmentation)) if segmentation else None
            ),
            image_png=_base64_png(analysis.image.pixels) if context.include_image else None,
            **_common(analysis, context),
        )
    )


def mask_png(analysis: Analysis, context: Context) -> Response:
    """The mask itself; the model, area, frame and quality verdict in headers."""
    segmentation = analysis.segmentation
    assert segmentation is not None
    facts = analysis.image
    return Response(
        encode_png(segmentation.mask),
        media_type=PNG_MEDIA_TYPE,
        headers={
            **_VARY,
            "X-Model-Name": segmentation.model.name,
            "X-Model-Version": segmentation.model.version,
            "X-Lesion-Area-Fraction": f"{segmentation.lesion_area_fraction:.6f}",
            "X-Frame": str(facts.frame),
            "X-In-Distribution": "true" if facts.quality.in_distribution else "false",
            "X-Quality-Score": f"{facts.quality.score:.4f}",
        },
    )


def dicom_seg(analysis: Analysis, context: Context) -> Response:
    """The DICOM Segmentation of the analysed frame as the body."""
    seg = context.dicom.segmentation(analysis)
    return Response(to_bytes(seg), media_type=DICOM_MEDIA_TYPE, headers=_VARY)


def dicom_seg_and_sr(analysis: Analysis, context: Context) -> Response:
    """multipart/related: the SEG (when the finding is a lesion), the SR, then the
    presentation state that draws the finding on the source frame."""
    objects = context.dicom.diagnosis(analysis)
    body, content_type = multipart_related([to_bytes(ds) for ds in objects])
    return Response(body, headers={**_VARY, "Content-Type": content_type})


def fhir_report(analysis: Analysis, context: Context) -> Response:
    """The FHIR R4 DiagnosticReport, its Devices and Observations contained."""
    return JSONResponse(
        context.dicom.fhir_report(analysis), media_type=FHIR_MEDIA_TYPE, headers=_VARY
    )


# --- offers per endpoint ---------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """A representation an endpoint can answer with."""

    media_type: str
    encode: Encoder
    needs_dicom_input: bool = False

    @property
    def parsed(self) -> MediaType:
        return parse_media_type(self.media_type)


CLASSIFY_OFFERS = (Offer(JSON_MEDIA_TYPE, classify_json),)
SEGMENT_OFFERS = (
    Offer(JSON_MEDIA_TYPE, segment_json),
    Offer(PNG_MEDIA_TYPE, mask_png),
    Offer(DICOM_MEDIA_TYPE, dicom_seg, needs_dicom_input=True),
)
DIAGNOSE_OFFERS = (
    Offer(JSON_MEDIA_TYPE, diagnose_json),
    Offer(DICOM_MEDIA_TYPE, dicom_seg_and_sr, needs_dicom_input=True),
    Offer(MULTIPART_DICOM, dicom_seg_and_sr, needs_dicom_input=True),
    Offer(FHIR_MEDIA_TYPE, fhir_report),
)


def _preference(offer: Offer, ranges: Sequence[MediaRange]) -> tuple[float, int] | None:
    """(q, -position) of the most specific range matching `offer`; None if none does or q=0."""
    media_type = offer.parsed
    best: tuple[int, MediaRange] | None = None
    for media_range in ranges:
        specificity = media_range.specificity(media_type)
        if specificity is not None and (best is None or specificity > best[0]):
            best = (specificity, media_range)
    if best is None or best[1].q <= 0:
        return None
    return best[1].q, -best[1].position


def choose(accept: str, offers: Sequence[Offer], input_is_dicom: bool) -> Offer:
    """The offer `accept` prefers; raises DicomOutputNeedsDicomInputError (406) when only DICOM
    offers are acceptable and the input is no DICOM. See the module docstring for the rules."""
    ranges = parse_accept(accept)
    if not ranges:
        return offers[0]
    scored = [(_preference(offer, ranges), -i, offer) for i, offer in enumerate(offers)]
    acceptable = [(score, order, offer) for score, order, offer in scored if score is not None]
    possible = [item for item in acceptable if input_is_dicom or not item[2].needs_dicom_input]
    if possible:
        return max(possible, key=lambda item: (item[0], item[1]))[2]
    if acceptable:
        raise DicomOutputNeedsDicomInputError(NEEDS_DICOM_MESSAGE)
    return offers[0]


@dataclass(frozen=True)
class Presentation:
    """Turns one request's Analysis into the representation its Accept header asks for."""

    accept: str
    request_id: str
    dicom: DicomResults

    def encoder(
        self, offers: Sequence[Offer], image: ImageRequest, *, include_image: bool = False
    ) -> Callable[[Analysis], Response]:
        """The encoder for this request, chosen before any model runs (raises the 406)."""
        # Only a PNG or JPEG is known to have no study: bytes of no known format may still be
        # declared DICOM, and the decoder then answers 415 for them, which says what is wrong.
        input_format = sniff_format(image.data)
        offer = choose(self.accept, offers, input_is_dicom=input_format not in ("png", "jpeg"))
        context = Context(self.request_id, self.dicom, include_image)
        return partial(_encode, offer.encode, context)


def _encode(encode: Encoder, context: Context, analysis: Analysis) -> Response:
    with tracing.span("present"):
        return encode(analysis, context)


async def get_presentation(  # on the event loop: see service.deps
    request: Request, dicom: Annotated[DicomResults, Depends(get_dicom_results)]
) -> Presentation:
    return Presentation(
        accept=request.headers.get("accept", ""),
        request_id=request.scope["state"]["request_id"],
        dicom=dicom,
    )


PresentationDep = Annotated[Presentation, Depends(get_presentation)]
