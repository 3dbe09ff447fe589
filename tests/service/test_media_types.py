"""service.media_types: the one parser of Content-Type values and Accept headers."""

from __future__ import annotations

import pytest

from service.media_types import parse_accept, parse_media_type


def test_accept_parsing_keeps_parameters_and_drops_extensions_after_q() -> None:
    (media_range,) = parse_accept('Multipart/Related; Type="application/dicom"; q=0.7; ext=1')
    assert (media_range.type, media_range.subtype) == ("multipart", "related")
    assert media_range.params == {"type": "application/dicom"}
    assert media_range.q == 0.7
    assert parse_accept("*/png, image, /x") == []


def test_content_type_parsing_keeps_the_case_of_values_and_unquotes_them() -> None:
    media_type = parse_media_type(
        'Multipart/Related; Type="application/dicom"; BOUNDARY = "Ab;c\\"d"'
    )
    assert media_type.essence == "multipart/related"
    assert (media_type.type, media_type.subtype) == ("multipart", "related")
    assert media_type.params == {"type": "application/dicom", "boundary": 'Ab;c"d'}


@pytest.mark.parametrize(
    ("value", "essence"),
    [
        (None, ""),
        ("", ""),
        ("image/png", "image/png"),
        (" IMAGE/PNG ; charset=x", "image/png"),
        ("image / png", "image / png"),  # not a media type: matches nothing offered
        ("application/dicom", "application/dicom"),
    ],
)
def test_the_essence_is_the_lower_case_type_as_sent(value: str | None, essence: str) -> None:
    assert parse_media_type(value).essence == essence


def test_a_parameter_without_a_value_is_dropped_and_the_last_of_a_name_wins() -> None:
    media_type = parse_media_type("multipart/related; boundary; type=a; type=b")
    assert media_type.params == {"type": "b"}
