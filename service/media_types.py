"""The one parser of media types (RFC 9110 8.3.1, 12.5.1): a request's Content-Type, a multipart
part's, each element of an Accept header, and the media types the endpoints offer.

`type/subtype` is case-insensitive and so is a parameter's name; a parameter's value keeps its
case (a multipart boundary is case-sensitive) and comparing it is the caller's business. A
quoted value may hold `;` and `,` (RFC 9110 5.6.4), so neither splits inside quotes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaType:
    """A parsed media type: `type/subtype` and its parameters."""

    essence: str  # "type/subtype" in lower case as it was sent; "" when none was
    parameters: tuple[tuple[str, str], ...] = ()  # in the order sent: lower-case names, unquoted

    @property
    def type(self) -> str:
        return self.essence.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.essence.partition("/")[2]

    @property
    def params(self) -> dict[str, str]:
        """The parameters by name (of a name sent twice, the last)."""
        return dict(self.parameters)


def parse_media_type(value: str | None) -> MediaType:
    """`multipart/related; type="application/dicom"; boundary=x` -> its essence and parameters.

    Parameters without `=` are dropped; nothing raises: what is not a media type parses into an
    essence that matches none (and "" for an absent or empty header).
    """
    fields = _split(value or "", ";")
    parameters = []
    for field in fields[1:]:
        name, sep, raw = field.partition("=")
        if sep:
            parameters.append((name.strip().lower(), _unquote(raw.strip())))
    return MediaType(fields[0].strip().lower(), tuple(parameters))


@dataclass(frozen=True)
class MediaRange:
    """One element of an Accept header."""

    type: str  # lower case; "*" for any
    subtype: str
    params: dict[str, str]  # lower-case names and values, quotes removed; q not included
    q: float
    position: int  # where the client listed it

    def specificity(self, media_type: MediaType) -> int | None:
        """How specifically this range matches `media_type` (higher: more), or None."""
        if self.type != "*" and self.type != media_type.type:
            return None
        if self.subtype != "*" and self.subtype != media_type.subtype:
            return None
        params = {name: value.lower() for name, value in media_type.params.items()}
        for name, value in params.items():
            if name in self.params and self.params[name] != value:
                return None
        if self.type == "*":
            return 0
        if self.subtype == "*":
            return 1
        return 2 + sum(name in self.params for name in params)


def parse_accept(header: str) -> list[MediaRange]:
    """The media ranges of an Accept header; malformed elements (and bad q-values) are dropped.

    Parameters after q are accept-extensions, not media type parameters (RFC 9110 12.5.1).
    """
    ranges = []
    for position, item in enumerate(_split(header, ",")):
        media_type = parse_media_type(item)
        type_, slash, subtype = media_type.essence.partition("/")
        if not slash or not type_ or not subtype or (type_ == "*" and subtype != "*"):
            continue
        params: dict[str, str] = {}
        q: float | None = 1.0
        for name, value in media_type.parameters:
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = None
                if q is not None and not 0.0 <= q <= 1.0:
                    q = None
                break
            params[name] = value.lower()
        if q is not None:
            ranges.append(MediaRange(type_, subtype, params, q, position))
    return ranges


def _split(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside quoted strings (a backslash escapes inside them)."""
    pieces, start, quoted, escaped = [], 0, False, False
    for i, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return pieces


def _unquote(value: str) -> str:
    """A quoted-string's content, its quoted-pairs undone (RFC 9110 5.6.4); a token as it is."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    inner, out, escaped = value[1:-1], [], False
    for char in inner:
        if escaped or char != "\\":
            out.append(char)
            escaped = False
        else:
            escaped = True
    return "".join(out)
