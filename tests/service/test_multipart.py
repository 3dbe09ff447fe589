"""service.dicom.multipart: multipart/related read and written, each part's bytes exact."""

from __future__ import annotations

import pytest

from service.dicom.multipart import (
    MalformedMultipartError,
    Part,
    multipart_related,
    split_multipart,
)
from service.media_types import parse_media_type


def test_what_the_writer_makes_the_reader_splits_back_byte_for_byte() -> None:
    parts = [b"\x00DICM\r\n--not-a-boundary\r\n", b"", b"\xff" * 300]
    body, content_type = multipart_related(parts)
    media_type = parse_media_type(content_type)
    assert media_type.essence == "multipart/related"
    assert media_type.params["type"] == "application/dicom"
    assert split_multipart(body, media_type.params["boundary"]) == [
        Part("application/dicom", data) for data in parts
    ]


def test_the_epilogue_is_ignored_and_part_types_are_read_case_blind() -> None:
    body = (
        b"--Ab\r\nCONTENT-TYPE: Application/DICOM; transfer-syntax=1.2\r\n\r\n"
        b"one\r\n--Ab\r\n\r\ntwo\r\n--Ab--\r\nepilogue"
    )
    assert split_multipart(body, "Ab") == [Part("application/dicom", b"one"), Part("", b"two")]


@pytest.mark.parametrize(
    "body",
    [b"no boundary here", b"--Ab\r\nContent-Type: application/dicom", b"--Ab--\r\n"],
)
def test_a_body_that_cannot_be_split_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedMultipartError):
        split_multipart(body, "Ab")


def test_a_preamble_before_the_first_delimiter_is_ignored() -> None:
    """RFC 2046 5.1.1: a preamble may precede the first delimiter, which then follows a CRLF."""
    body = (
        b"This is a preamble.\r\n--Ab\r\nContent-Type: application/dicom\r\n\r\none\r\n--Ab--\r\n"
    )
    assert split_multipart(body, "Ab") == [Part("application/dicom", b"one")]
    glued = b"preamble--Ab\r\n\r\none\r\n--Ab--"  # no CRLF before the delimiter: still read
    assert split_multipart(glued, "Ab") == [Part("", b"one")]
