"""Bulk data: which stored elements were left out of the metadata, their BulkDataURIs, and reading
their values back out of the stored instance bytes (PS3.18 8.7.3.3, F.2.6)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from lucerna.core.storage.ports import DicomJson
from lucerna.metadata.errors import NotFoundError, StoredDataError

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
PIXEL_DATA_TAGS = frozenset({"7FE00008", "7FE00009", "7FE00010"})  # Float, Double Float, Pixel Data
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PATH = re.compile(r"^[0-9A-F]{8}(/\d+/[0-9A-F]{8})*$")


def is_bulk_placeholder(element: Any) -> bool:
    """Whether a stored DICOM JSON element is a binary value kept only in the blob (``{"vr": VR}``)."""
    return (
        isinstance(element, dict)
        and element.get("vr") in BINARY_VRS
        and not any(key in element for key in ("Value", "InlineBinary", "BulkDataURI"))
    )


def with_bulkdata_uris(dataset: DicomJson, uri_for: Callable[[str], str]) -> DicomJson:
    """A copy of ``dataset`` whose bulk placeholders carry a BulkDataURI; ``uri_for`` maps an element
    path (``7FE00010``, or ``00880200/0/7FE00010`` inside a sequence item) to its URI."""
    return _annotate(dataset, "", uri_for)


def _annotate(dataset: DicomJson, prefix: str, uri_for: Callable[[str], str]) -> DicomJson:
    out: DicomJson = {}
    for tag, element in dataset.items():
        path = f"{prefix}{tag}"
        if is_bulk_placeholder(element):
            out[tag] = {"vr": element["vr"], "BulkDataURI": uri_for(path)}
        elif isinstance(element, dict) and element.get("vr") == "SQ" and element.get("Value"):
            items = [
                _annotate(item, f"{path}/{index}/", uri_for) if isinstance(item, dict) else item
                for index, item in enumerate(element["Value"])
            ]
            out[tag] = {**element, "Value": items}
        else:
            out[tag] = copy.deepcopy(element)
    return out


def parse_path(text: str) -> list[tuple[int, int | None]]:
    """A bulk data path as (tag, item index of the next level or None) steps; 404 when malformed."""
    upper = text.strip("/").upper()
    if not _PATH.match(upper):
        raise NotFoundError(
            f"bulk data {text!r}: expected a tag (8 hex digits) or tag/item/tag/... in sequences"
        )
    pieces = upper.split("/")
    steps: list[tuple[int, int | None]] = []
    for index in range(0, len(pieces), 2):
        item = int(pieces[index + 1]) if index + 1 < len(pieces) else None
        steps.append((int(pieces[index], 16), item))
    return steps


def read_dataset(data: bytes) -> Dataset:
    """The stored instance parsed (pixel data included, as raw bytes)."""
    try:
        return dcmread(BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, ValueError, OSError) as error:
        raise StoredDataError(f"the stored instance cannot be parsed: {error}") from error


@dataclass(frozen=True)
class BulkValue:
    """The raw bytes of one binary element, as stored, and how to read them."""

    tag: int
    vr: str
    value: bytes
    little_endian: bool


def element_value(dataset: Dataset, path: str) -> BulkValue:
    """The raw value of the binary element at ``path``; 404 when absent or not binary."""
    current = dataset
    steps = parse_path(path)
    for tag, item in steps[:-1]:
        assert item is not None  # parse_path pairs every inner step with an item index
        if tag not in current or current[tag].VR != "SQ" or item >= len(current[tag].value):
            raise NotFoundError(f"bulk data {path!r}: no sequence item {item} of {tag:08X} in this instance")
        current = current[tag].value[item]
    tag = steps[-1][0]
    if tag not in current:
        raise NotFoundError(f"bulk data {path!r}: element {tag:08X} is not in this instance")
    element = current[tag]
    if element.VR not in BINARY_VRS or not isinstance(element.value, bytes | bytearray):
        raise NotFoundError(f"bulk data {path!r}: element {tag:08X} ({element.VR}) is not bulk data")
    little = dataset.original_encoding[1]
    return BulkValue(tag, str(element.VR), bytes(element.value), True if little is None else bool(little))


def little_endian(value: bytes, word_size: int) -> bytes:
    """Big-endian words of ``word_size`` bytes swapped to little endian."""
    if word_size <= 1:
        return value
    swapped = bytearray(len(value))
    for offset in range(word_size):
        swapped[offset::word_size] = value[word_size - 1 - offset :: word_size]
    return bytes(swapped)


def as_little_endian(bulk: BulkValue) -> bytes:
    """A non-pixel bulk value in little-endian byte order (the order DICOMweb bulk data uses)."""
    if bulk.little_endian:
        return bulk.value
    return little_endian(bulk.value, _WORD_SIZE.get(bulk.vr, 1))
