"""The streaming multipart parser and Content-Type parameters."""

from __future__ import annotations

import pytest

from lucerna.ingestion.multipart import (
    MalformedMultipartError,
    MultipartParser,
    PayloadTooLargeError,
    parse_content_type,
)

BOUNDARY = "XyZ-boundary-42"


def body(*contents: bytes, boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for content in contents:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode() + epilogue


def parse(data: bytes, chunk: int, boundary: str = BOUNDARY, limit: int = 1 << 30) -> list[bytes]:
    parser = MultipartParser(boundary, limit)
    for start in range(0, len(data), chunk):
        parser.feed(data[start : start + chunk])
    return [part.body for part in parser.finish()]


CONTENTS = (b"first \r\n part", b"", b"\r\n--XyZ-boundary-4 almost a delimiter\r\n", bytes(range(256)) * 40)


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 1000, 1 << 20])
def test_parts_come_out_whole_whatever_the_chunking(chunk: int) -> None:
    assert parse(body(*CONTENTS), chunk) == list(CONTENTS)


def test_part_headers_and_content_type() -> None:
    data = (
        f"--{BOUNDARY}\r\nContent-Type: Application/DICOM; transfer-syntax=1.2.840.10008.1.2.1\r\n"
        f"X-Folded: one\r\n two\r\n\r\nABC\r\n--{BOUNDARY}\r\n\r\nno headers\r\n--{BOUNDARY}--"
    ).encode()
    parser = MultipartParser(BOUNDARY, 1000)
    parser.feed(data)
    first, second = parser.finish()
    assert first.content_type == "application/dicom"
    assert first.headers["x-folded"] == "one two"
    assert first.body == b"ABC"
    assert second.headers == {}
    assert second.content_type is None
    assert second.body == b"no headers"


def test_preamble_and_epilogue_are_ignored() -> None:
    data = body(b"one", b"two", preamble=b"This is a preamble.\r\n", epilogue=b"and an epilogue\r\n" * 100)
    assert parse(data, 5) == [b"one", b"two"]


def test_transport_padding_after_a_delimiter_is_allowed() -> None:
    data = f"--{BOUNDARY}  \t\r\n\r\npadded\r\n--{BOUNDARY}--".encode()
    assert parse(data, 3) == [b"padded"]


def test_a_body_without_the_closing_delimiter_is_truncated() -> None:
    data = body(b"one", b"two")
    complete_parts = data[: data.rindex(f"--{BOUNDARY}--".encode())]
    with pytest.raises(MalformedMultipartError, match="truncated"):
        parse(complete_parts, 10)


def test_a_body_cut_inside_a_part_is_truncated() -> None:
    data = body(b"x" * 5000)
    with pytest.raises(MalformedMultipartError, match="truncated"):
        parse(data[:3000], 100)


def test_a_body_with_no_delimiter_at_all() -> None:
    with pytest.raises(MalformedMultipartError, match="no multipart delimiter"):
        parse(b"just some bytes, not multipart", 4)


def test_the_boundary_inside_content_without_crlf_is_malformed() -> None:
    data = f"--{BOUNDARY}\r\n\r\nabc\r\n--{BOUNDARY}X\r\n--{BOUNDARY}--".encode()
    with pytest.raises(MalformedMultipartError, match="without being a delimiter"):
        parse(data, 1000)


def test_a_malformed_header_line() -> None:
    data = f"--{BOUNDARY}\r\nnot a header\r\n\r\nabc\r\n--{BOUNDARY}--".encode()
    with pytest.raises(MalformedMultipartError, match="header"):
        parse(data, 1000)


def test_oversized_part_headers() -> None:
    parser = MultipartParser(BOUNDARY, 1 << 20, max_header_bytes=100)
    with pytest.raises(MalformedMultipartError, match="exceed"):
        parser.feed(f"--{BOUNDARY}\r\nX-Long: {'a' * 200}".encode())


def test_the_limit_is_enforced_while_reading() -> None:
    parser = MultipartParser(BOUNDARY, 1000)
    parser.feed(b"x" * 600)
    with pytest.raises(PayloadTooLargeError, match="1000 bytes"):
        parser.feed(b"x" * 600)


def test_epilogue_counts_towards_the_limit() -> None:
    data = body(b"one", epilogue=b"e" * 2000)
    with pytest.raises(PayloadTooLargeError):
        parse(data, 100, limit=len(data) - 1)


def test_quoted_boundary_with_special_characters() -> None:
    media, params = parse_content_type(
        'Multipart/Related; type="application/dicom"; boundary="a:b=c; d\\"e"; start="<x>"'
    )
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": 'a:b=c; d"e', "start": "<x>"}
    assert parse(body(b"payload", boundary='a:b=c; d"e'), 3, boundary='a:b=c; d"e') == [b"payload"]


def test_unquoted_parameters_and_spacing() -> None:
    assert parse_content_type("multipart/related ;boundary=abc/def= ; TYPE = application/dicom") == (
        "multipart/related",
        {"boundary": "abc/def=", "type": "application/dicom"},
    )


@pytest.mark.parametrize(
    "header",
    ["", "multipart", "multipart/related; boundary", 'multipart/related; boundary="open', "a/b; x=1 y"],
)
def test_malformed_content_types(header: str) -> None:
    with pytest.raises(ValueError):
        parse_content_type(header)
