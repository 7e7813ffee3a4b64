"""multipart/related response bodies (RFC 2387, PS3.18 8.6.1.2), written part by part."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Part:
    """One body part: its content type and bytes, plus optional extra headers (e.g. Content-Location)."""

    content_type: str
    data: bytes
    headers: tuple[tuple[str, str], ...] = field(default=())


def new_boundary() -> str:
    """A boundary that will not occur in DICOM data by chance (128 random bits)."""
    return f"lucerna-{uuid.uuid4().hex}"


def content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The Content-Type header of a multipart/related response whose parts are ``part_type``."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return f"{value}; transfer-syntax={transfer_syntax}" if transfer_syntax else value


def part_header(part: Part, boundary: str) -> bytes:
    """The delimiter and headers that open a part."""
    lines = [f"--{boundary}", f"Content-Type: {part.content_type}", f"Content-Length: {len(part.data)}"]
    lines += [f"{name}: {value}" for name, value in part.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def closing(boundary: str) -> bytes:
    """The close delimiter that ends the body."""
    return f"--{boundary}--\r\n".encode("latin-1")


async def stream_parts(parts: AsyncIterable[Part], boundary: str) -> AsyncIterator[bytes]:
    """The body, one part at a time: only the part being sent is held in memory."""
    async for part in parts:
        yield part_header(part, boundary)
        yield part.data
        yield b"\r\n"
    yield closing(boundary)


def encode_parts(parts: Iterable[Part], boundary: str) -> bytes:
    """A whole (small) body at once."""
    chunks: list[bytes] = []
    for part in parts:
        chunks += [part_header(part, boundary), part.data, b"\r\n"]
    chunks.append(closing(boundary))
    return b"".join(chunks)
