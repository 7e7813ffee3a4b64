"""Accept header negotiation and the multipart/related writer (pure)."""

import pytest

from lucerna.metadata.multipart import Part, content_type, encode_parts, new_boundary, stream_parts
from lucerna.metadata.negotiation import accepted_transfer_syntax, choose_json, parse_accept
from tests.unit.metadata.dicomweb_testkit import read_parts

pytestmark = pytest.mark.unit


def test_accept_ranges_are_ordered_by_weight_and_keep_quoted_parameters() -> None:
    ranges = parse_accept(
        "application/json;q=0.5, "
        'multipart/related; type="application/dicom"; transfer-syntax=*, '
        "text/html;q=0"
    )
    assert [r.media_type for r in ranges] == ["multipart/related", "application/json"]
    assert ranges[0].params == {"type": "application/dicom", "transfer-syntax": "*"}


def test_missing_accept_means_anything() -> None:
    assert [r.media_type for r in parse_accept(None)] == ["*/*"]
    assert [r.media_type for r in parse_accept("  ")] == ["*/*"]


@pytest.mark.parametrize(
    ("header", "chosen"),
    [
        (None, "application/dicom+json"),
        ("*/*", "application/dicom+json"),
        ("application/dicom+json", "application/dicom+json"),
        ("application/json", "application/json"),
        ("application/*", "application/dicom+json"),
        ("text/html", None),
        ('multipart/related; type="application/dicom+xml"', None),
    ],
)
def test_json_negotiation(header: str | None, chosen: str | None) -> None:
    assert choose_json(header) == chosen


@pytest.mark.parametrize(
    ("header", "syntax"),
    [
        ("*/*", "*"),
        ("multipart/related", "*"),
        ('multipart/related; type="application/dicom"', "*"),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1',
            "1.2.840.10008.1.2.1",
        ),
        ('multipart/related; type="image/jpeg"', None),
        ("application/dicom; transfer-syntax=*", "*"),
        ("image/png", None),
    ],
)
def test_transfer_syntax_asked_for(header: str, syntax: str | None) -> None:
    assert accepted_transfer_syntax(parse_accept(header)[0], "application/dicom") == syntax


def test_multipart_body_round_trips_binary_parts() -> None:
    boundary = new_boundary()
    parts = [
        Part("application/dicom", bytes(range(256)) * 3, (("Content-Location", "http://x/1"),)),
        Part("application/dicom", b"\r\n--not-a-boundary\r\n"),
    ]
    body = encode_parts(parts, boundary)
    read = read_parts(content_type("application/dicom", boundary), body)
    assert [payload for _, payload in read] == [p.data for p in parts]
    assert read[0][0]["content-location"] == "http://x/1"
    assert read[0][0]["content-type"] == "application/dicom"


async def test_streamed_body_equals_encoded_body() -> None:
    boundary = new_boundary()
    parts = [Part("application/octet-stream", b"a" * 10), Part("application/octet-stream", b"")]

    async def source():  # type: ignore[no-untyped-def]
        for part in parts:
            yield part

    streamed = b"".join([chunk async for chunk in stream_parts(source(), boundary)])
    assert streamed == encode_parts(parts, boundary)


def test_content_type_names_the_part_type_and_boundary() -> None:
    assert content_type("image/jpeg", "b1") == 'multipart/related; type="image/jpeg"; boundary=b1'
