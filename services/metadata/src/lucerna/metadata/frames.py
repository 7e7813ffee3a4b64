"""Frames of an instance's pixel data (PS3.18 10.4.1.1.4, 8.7.3.5): native frames sliced by size,
encapsulated frames split with pydicom's encapsulation helpers, each with its media type."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from lucerna.metadata.bulkdata import little_endian
from lucerna.metadata.errors import InvalidRequestError, NotAcceptableError, NotFoundError, StoredDataError

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
OCTET_STREAM = "application/octet-stream"

# PS3.18 Table 8.7.3-2 (media types of compressed frames).
FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.4.110": "image/jxl",
    "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
VIDEO_TRANSFER_SYNTAXES = frozenset(
    f"1.2.840.10008.1.2.4.{n}" for n in (100, 101, 102, 103, 104, 105, 106, 107, 108)
)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)


def parse_frame_list(text: str) -> list[int]:
    """``1,2,5`` as frame numbers (1-based, in the order asked); 400 when malformed."""
    numbers: list[int] = []
    for piece in text.split(","):
        item = piece.strip()
        if not item.isdigit() or int(item) < 1:
            raise InvalidRequestError(f"frame list {text!r}: {item!r} is not a frame number (1, 2, ...)")
        numbers.append(int(item))
    return numbers


@dataclass(frozen=True)
class PixelFrames:
    """The frames of one instance and how to label them."""

    transfer_syntax: str
    encapsulated: bool
    frames: tuple[bytes, ...]

    @property
    def media_type(self) -> str:
        """The media type of one frame: the compressed format, or octet-stream for native pixels."""
        if not self.encapsulated:
            return OCTET_STREAM
        return FRAME_MEDIA_TYPES.get(self.transfer_syntax, OCTET_STREAM)

    @property
    def part_transfer_syntax(self) -> str:
        """The transfer syntax the frame bytes are in (native frames are served little endian)."""
        return self.transfer_syntax if self.encapsulated else EXPLICIT_VR_LITTLE_ENDIAN

    def select(self, numbers: list[int]) -> list[bytes]:
        """The frames asked for; 404 for a number beyond the last frame."""
        for number in numbers:
            if number > len(self.frames):
                raise NotFoundError(
                    f"frame {number} is out of range: this instance has {len(self.frames)} frame(s)"
                )
        return [self.frames[number - 1] for number in numbers]


def pixel_frames(dataset: Dataset, transfer_syntax: str) -> PixelFrames:
    """All frames of a parsed instance; 404 when it has no pixel data, 406 for video."""
    tag = next((t for t in _PIXEL_TAGS if t in dataset), None)
    if tag is None:
        raise NotFoundError("this instance has no pixel data")
    if transfer_syntax in VIDEO_TRANSFER_SYNTAXES:
        raise NotAcceptableError(
            f"the pixel data is a video stream ({transfer_syntax}); Lucerna does not split it into frames,"
            " retrieve the instance instead"
        )
    value = dataset[tag].value
    if not isinstance(value, bytes | bytearray):
        raise NotFoundError("this instance's pixel data has no value")
    count = _number_of_frames(dataset)
    syntax = UID(transfer_syntax)
    if syntax.is_encapsulated and tag == 0x7FE00010:
        offsets = None
        if 0x7FE00001 in dataset and 0x7FE00002 in dataset:
            offsets = (bytes(dataset[0x7FE00001].value), bytes(dataset[0x7FE00002].value))
        try:
            frames = tuple(generate_frames(bytes(value), number_of_frames=count, extended_offsets=offsets))
        except ValueError as error:
            raise StoredDataError(
                f"the encapsulated pixel data cannot be split into frames: {error}"
            ) from error
        return PixelFrames(transfer_syntax, True, frames)
    big_endian = transfer_syntax == EXPLICIT_VR_BIG_ENDIAN
    return PixelFrames(transfer_syntax, False, _native_frames(dataset, bytes(value), count, big_endian, tag))


def _number_of_frames(dataset: Dataset) -> int:
    try:
        count = int(dataset.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        count = 1
    return max(count, 1)


def _native_frames(
    dataset: Dataset, value: bytes, count: int, big_endian: bool, tag: int
) -> tuple[bytes, ...]:
    bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(tag) or int(dataset.get("BitsAllocated", 8) or 8)
    frame_bits = int(dataset.Rows) * int(dataset.Columns) * int(dataset.get("SamplesPerPixel", 1) or 1) * bits
    if frame_bits * count > len(value) * 8:
        raise StoredDataError(
            f"the pixel data holds {len(value)} bytes, fewer than {count} frame(s) of {frame_bits // 8} bytes"
        )
    if big_endian and bits > 8:
        value = little_endian(value, bits // 8)
    if frame_bits % 8 == 0:
        size = frame_bits // 8
        return tuple(value[index * size : (index + 1) * size] for index in range(count))
    return tuple(_bit_slice(value, index * frame_bits, frame_bits) for index in range(count))


def _bit_slice(value: bytes, start: int, length: int) -> bytes:
    """Bits [start, start+length) of 1-bit packed pixels (least significant bit first) as whole bytes."""
    chunk = value[start // 8 : (start + length + 7) // 8 + 1]
    number = int.from_bytes(chunk, "little") >> (start % 8)
    number &= (1 << length) - 1
    return number.to_bytes((length + 7) // 8, "little")
