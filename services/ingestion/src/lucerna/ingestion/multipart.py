"""A streaming multipart (RFC 2046) body parser, and Content-Type parameters (RFC 9110 8.3).

The parser is fed the body chunk by chunk as it arrives, enforces a size limit while reading, and
hands out the parts only once the closing delimiter has been seen: a body that ends early is an
error, never a shorter list of parts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_MEDIA_TYPE = re.compile(rf"{_TOKEN.pattern}/{_TOKEN.pattern}")
_LENIENT_VALUE = re.compile(r"[^;\s\"]+")  # unquoted values some clients send with characters a token forbids
MAX_BOUNDARY = 200  # RFC 2046 says 70; a few clients exceed it harmlessly
_MAX_PADDING = 1024  # transport padding (spaces, tabs) allowed after a delimiter


class MalformedMultipartError(ValueError):
    """The body is not a complete, well-formed multipart body."""


class PayloadTooLargeError(ValueError):
    """The body is larger than the configured limit."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype`` in lower case and the parameters (names in lower case, values unquoted).

    Raises ``ValueError`` when the header is not a media type with well-formed parameters.
    """
    media, _, rest = value.partition(";")
    media = media.strip().lower()
    if not _MEDIA_TYPE.fullmatch(media):
        raise ValueError(f"{value.strip()!r} is not a media type")
    params: dict[str, str] = {}
    pos, end = 0, len(rest)
    while True:
        while pos < end and rest[pos] in " \t;":
            pos += 1
        if pos >= end:
            return media, params
        name = _TOKEN.match(rest, pos)
        if name is None:
            raise ValueError(f"malformed parameter in {value.strip()!r}")
        pos = _skip_spaces(rest, name.end())
        if pos >= end or rest[pos] != "=":
            raise ValueError(f"parameter {name.group()!r} has no value in {value.strip()!r}")
        pos = _skip_spaces(rest, pos + 1)
        if pos < end and rest[pos] == '"':
            text, pos = _quoted_string(rest, pos, value)
        else:
            unquoted = _LENIENT_VALUE.match(rest, pos)
            if unquoted is None:
                raise ValueError(f"parameter {name.group()!r} has no value in {value.strip()!r}")
            text, pos = unquoted.group(), unquoted.end()
        params[name.group().lower()] = text
        pos = _skip_spaces(rest, pos)
        if pos < end and rest[pos] != ";":
            raise ValueError(
                f"unexpected {rest[pos]!r} after parameter {name.group()!r} in {value.strip()!r}"
            )


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t":
        pos += 1
    return pos


def _quoted_string(text: str, pos: int, header: str) -> tuple[str, int]:
    out: list[str] = []
    pos += 1
    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            out.append(text[pos + 1])
            pos += 2
        elif char == '"':
            return "".join(out), pos + 1
        else:
            out.append(char)
            pos += 1
    raise ValueError(f"unterminated quoted string in {header.strip()!r}")


@dataclass(frozen=True)
class Part:
    """One body part: its header fields (names in lower case) and its content."""

    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str | None:
        """The part's Content-Type media type in lower case; None when absent or unreadable."""
        header = self.headers.get("content-type")
        if header is None:
            return None
        try:
            return parse_content_type(header)[0]
        except ValueError:
            return None


class _State(enum.Enum):
    PREAMBLE = enum.auto()
    DELIMITER = enum.auto()  # just after a boundary delimiter: "--" closes, else padding + CRLF
    HEADERS = enum.auto()
    BODY = enum.auto()
    EPILOGUE = enum.auto()


class MultipartParser:
    """Incremental parser of one multipart body with the given boundary."""

    def __init__(self, boundary: str, max_bytes: int, max_header_bytes: int = 16 * 1024) -> None:
        if not 0 < len(boundary) <= MAX_BOUNDARY:
            raise ValueError(
                f"a multipart boundary has 1 to 70 characters (RFC 2046; up to {MAX_BOUNDARY} taken)"
            )
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._max_bytes = max_bytes
        self._max_header_bytes = max_header_bytes
        # The first delimiter may open the body with no CRLF before it: start as if one came.
        self._buffer = bytearray(b"\r\n")
        self._scan_from = 0
        self._state = _State.PREAMBLE
        self._received = 0
        self._headers: dict[str, str] = {}
        self._parts: list[Part] = []

    @property
    def received(self) -> int:
        """Bytes fed so far."""
        return self._received

    def feed(self, chunk: bytes) -> None:
        """Take the next chunk of the body; raises ``PayloadTooLargeError`` or ``MalformedMultipartError``."""
        self._received += len(chunk)
        if self._received > self._max_bytes:
            raise PayloadTooLargeError(f"the body exceeds the limit of {self._max_bytes} bytes")
        if self._state is _State.EPILOGUE or not chunk:
            return
        self._buffer += chunk
        self._advance()

    def finish(self) -> list[Part]:
        """The parts, once the whole body has been fed; ``MalformedMultipartError`` if it is incomplete."""
        if self._state is _State.EPILOGUE:
            return self._parts
        if self._state is _State.PREAMBLE:
            raise MalformedMultipartError(
                "the body holds no multipart delimiter with the boundary of its Content-Type"
            )
        raise MalformedMultipartError("the body ended before the closing multipart delimiter (truncated)")

    def _advance(self) -> None:
        buffer = self._buffer
        while True:
            if self._state in (_State.PREAMBLE, _State.BODY):
                index = buffer.find(self._delimiter, self._scan_from)
                if index < 0:
                    self._scan_from = max(0, len(buffer) - len(self._delimiter) + 1)
                    if self._state is _State.PREAMBLE:  # the preamble is discarded as it goes
                        del buffer[: self._scan_from]
                        self._scan_from = 0
                    return
                if self._state is _State.BODY:
                    with memoryview(buffer) as view:
                        self._parts.append(Part(self._headers, bytes(view[:index])))
                del buffer[: index + len(self._delimiter)]
                self._scan_from = 0
                self._state = _State.DELIMITER
            elif self._state is _State.DELIMITER:
                if not self._after_delimiter():
                    return
            elif self._state is _State.HEADERS:
                if not self._read_headers():
                    return
            else:
                buffer.clear()
                return

    def _after_delimiter(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer[:2] == b"--":
            self._state = _State.EPILOGUE
            return True
        pad = 0
        while pad < len(buffer) and buffer[pad] in b" \t":
            pad += 1
        if pad > _MAX_PADDING:
            raise MalformedMultipartError("a multipart delimiter is followed by too much padding")
        if len(buffer) < pad + 2:
            return False
        if buffer[pad : pad + 2] != b"\r\n":
            raise MalformedMultipartError(
                "the boundary occurs in the body without being a delimiter (one is followed by CRLF or --)"
            )
        del buffer[: pad + 2]
        self._state = _State.HEADERS
        return True

    def _read_headers(self) -> bool:
        buffer = self._buffer
        if len(buffer) < 2:
            return False
        if buffer[:2] == b"\r\n":  # a part with no header fields
            self._headers = {}
            del buffer[:2]
            self._state = _State.BODY
            return True
        end = buffer.find(b"\r\n\r\n", 0, self._max_header_bytes + 4)
        if end < 0:
            if len(buffer) > self._max_header_bytes:
                raise MalformedMultipartError(f"a part's header fields exceed {self._max_header_bytes} bytes")
            return False
        self._headers = _parse_header_block(bytes(buffer[:end]))
        del buffer[: end + 4]
        self._state = _State.BODY
        return True


def _parse_header_block(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    last: str | None = None
    for line in block.decode("latin-1").split("\r\n"):
        if line[:1] in (" ", "\t") and last is not None:  # obsolete line folding
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedMultipartError(f"malformed part header line {line[:80]!r}")
        last = name.lower()
        headers[last] = value.strip()
    return headers
