"""Accept header parsing (RFC 9110 12.5.1) and the media types DICOMweb answers with (PS3.18 8.7)."""

from __future__ import annotations

from dataclasses import dataclass, field

DICOM_JSON = "application/dicom+json"
JSON = "application/json"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header, with its parameters (names lower-cased) and weight."""

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0

    @property
    def media_type(self) -> str:
        """``type/subtype``, lower-cased."""
        return f"{self.type}/{self.subtype}"

    def matches(self, media_type: str) -> bool:
        """Whether this range covers a concrete ``type/subtype`` (wildcards honoured)."""
        wanted_type, _, wanted_subtype = media_type.lower().partition("/")
        if self.type == "*":
            return True
        return self.type == wanted_type and self.subtype in {"*", wanted_subtype}


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an Accept header, best first (q descending, then as written).

    A missing or empty header means ``*/*``. Ranges with q=0 are dropped; malformed ones are skipped.
    """
    if header is None or not header.strip():
        return [MediaRange("*", "*")]
    ranges: list[MediaRange] = []
    for raw in _split_outside_quotes(header, ","):
        pieces = _split_outside_quotes(raw, ";")
        media_type = pieces[0].strip().lower()
        kind, slash, subtype = media_type.partition("/")
        if not slash or not kind or not subtype:
            continue
        params: dict[str, str] = {}
        q = 1.0
        for piece in pieces[1:]:
            name, equals, value = piece.strip().partition("=")
            if not equals:
                continue
            name = name.strip().lower()
            value = value.strip().strip('"')
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
            else:
                params[name] = value
        if q > 0:
            ranges.append(MediaRange(kind, subtype, params, q))
    return sorted(ranges, key=lambda r: -r.q)


def choose_json(header: str | None) -> str | None:
    """The JSON media type to answer a QIDO-RS or metadata request with, or None (406)."""
    for media_range in parse_accept(header):
        if media_range.matches(DICOM_JSON):
            return DICOM_JSON
        if media_range.matches(JSON):
            return JSON
    return None


def accepted_transfer_syntax(media_range: MediaRange, part_type: str) -> str | None:
    """The transfer syntax a range asks for parts of ``part_type`` (``*`` for any), or None when
    the range does not accept such parts at all.

    ``*/*``, ``multipart/*`` and ``multipart/related`` without a ``type`` accept any part type; the
    ``transfer-syntax`` parameter names one syntax or ``*``. Without it, Lucerna serves what is stored.
    """
    if media_range.type == "*" or (media_range.type == "multipart" and media_range.subtype == "*"):
        return "*"
    if media_range.media_type == MULTIPART_RELATED:
        inner = media_range.params.get("type")
        if inner is not None and not MediaRange(*_type_pair(inner)).matches(part_type):
            return None
    elif not media_range.matches(part_type):
        return None
    return media_range.params.get("transfer-syntax", "*")


def _type_pair(media_type: str) -> tuple[str, str]:
    kind, _, subtype = media_type.strip().lower().partition("/")
    return kind or "*", subtype or "*"


def is_multipart(media_range: MediaRange) -> bool:
    """Whether a range asks for a multipart/related answer (or leaves it open)."""
    return media_range.type in {"*", "multipart"}
