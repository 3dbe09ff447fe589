"""multipart/related both ways (PS3.18 8.6.1.2, RFC 2387): the parts of a STOW-RS request, and
the body of a DICOM answer or of a STOW-RS delivery. Each part's bytes are exact."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from service.dicom.builders import DICOM_MEDIA_TYPE
from service.media_types import parse_media_type
from shared.errors import InputError


class MalformedMultipartError(InputError):
    """A multipart/related body that cannot be split into its parts."""

    code = "malformed_multipart"


@dataclass(frozen=True)
class Part:
    media_type: str
    data: bytes


def iter_multipart(body: bytes, boundary: str) -> Iterator[Part]:
    """The parts of a PS3.18 8.6.1.2 / RFC 2046 multipart body, each part's bytes exact, one at a
    time: a caller that counts them can stop at a cap before the rest of the body is split.

    Raises MalformedMultipartError when the boundary never appears or a part has no header end.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    separator = b"\r\n" + delimiter
    first_end = body.find(separator)
    first = body if first_end < 0 else body[:first_end]
    if first.startswith(delimiter):  # no preamble: the body starts with the first delimiter
        position = len(delimiter)
    elif delimiter in first:  # a preamble glued to the first delimiter: read leniently
        position = first.index(delimiter) + len(delimiter)
    elif first_end >= 0:  # a preamble, then CRLF and the first delimiter (RFC 2046): ignored
        position = first_end + len(separator)
    else:
        raise MalformedMultipartError("the body does not contain the multipart boundary")
    found = False
    while True:
        end = body.find(separator, position)
        if body.startswith(b"--", position):  # the close delimiter: the epilogue is ignored
            break
        piece = body[position : len(body) if end < 0 else end]
        header_end = piece.find(b"\r\n\r\n")
        if header_end < 0:
            raise MalformedMultipartError("a multipart part has no end of headers")
        media_type = ""
        for line in piece[:header_end].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                media_type = parse_media_type(value).essence
        found = True
        yield Part(media_type, piece[header_end + 4 :])
        if end < 0:
            break
        position = end + len(separator)
    if not found:
        raise MalformedMultipartError("the multipart body holds no part")


def split_multipart(body: bytes, boundary: str) -> list[Part]:
    """Every part of a multipart body (iter_multipart); raises as it does."""
    return list(iter_multipart(body, boundary))


def multipart_related(
    parts: Sequence[bytes], media_type: str = DICOM_MEDIA_TYPE
) -> tuple[bytes, str]:
    """PS3.18 8.6.1.2 multipart/related body of `parts` and its Content-Type header value."""
    boundary = f"busi-{secrets.token_hex(16)}"
    chunks = []
    for part in parts:
        chunks.append(f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode("ascii"))
        chunks.append(part)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    content_type = f'multipart/related; type="{media_type}"; boundary={boundary}'
    return b"".join(chunks), content_type
