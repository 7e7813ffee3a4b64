"""DICOM JSON straight from the bytes of the common elements of a header, as pydicom would give it.

pydicom turns each raw element into a ``DataElement`` (VR lookup, value conversion, validation)
before it can be described, at several microseconds an element; a CT header has a few hundred.
Here the plain cases are decoded directly: explicit or public-tag VRs in little endian, single-byte
or UTF-8 text, numbers and short binary values. Anything else answers None and takes pydicom's path,
so the result is the same either way (checked against pydicom on its own corpus of odd files).
"""

from __future__ import annotations

import base64
import math
import re
import struct
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

NUMBER_FORMATS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
CODE_VRS = frozenset({"AS", "CS", "DA", "DT", "TM"})  # default repertoire; split, padding dropped at the end
TEXT_VRS = frozenset({"SH", "LO", "UC"})  # character set; each value's trailing padding dropped
SINGLE_TEXT_VRS = frozenset({"ST", "LT", "UT"})  # one value, backslashes are text
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
DEFAULT_ENCODING = "latin_1"  # pydicom's default ("iso8859") and ISO_IR 100 are this codec
# Specific Character Set values that are one codec for the whole header (no ISO 2022 switching).
SINGLE_ENCODINGS = {
    "": DEFAULT_ENCODING,
    "ISO_IR 6": DEFAULT_ENCODING,
    "ISO_IR 100": DEFAULT_ENCODING,
    "ISO_IR 192": "utf_8",
}
_IS = re.compile(r" *[+-]?[0-9]+ *")
_DS = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")


def header_encoding(ds: Dataset, inherited: str | None = DEFAULT_ENCODING) -> str | None:
    """The codec of the data set's text (a sequence item's is its parent's unless it has its own),
    or None when the plain decoding does not apply."""
    if config.datetime_conversion or config.use_DS_decimal or config.use_DS_numpy or config.use_IS_numpy:
        return None  # values would not be plain strings and numbers
    element = ds.get_item(0x00080005, keep_deferred=True)  # pydicom often has it converted already
    value = None if element is None else element.value
    if isinstance(value, bytes):
        value = value.decode(DEFAULT_ENCODING)
    if not value:
        return inherited
    return SINGLE_ENCODINGS.get(value.strip(" \0")) if isinstance(value, str) else None


def raw_json(raw: RawDataElement, encoding: str, bulk_bytes: int) -> dict[str, Any] | None:  # noqa: PLR0911
    """The element in DICOM JSON (binary above ``bulk_bytes`` as bulk), or None to let pydicom do it."""
    value = raw.value
    if not isinstance(value, bytes) or not raw.is_little_endian:
        return None
    vr = _vr(raw)
    if vr is None:
        return None
    if not value:
        return {"vr": vr}
    if vr in BINARY_VRS:
        if len(value) > bulk_bytes or raw.tag in (0x7FE00008, 0x7FE00009, 0x7FE00010):
            return {"vr": vr}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    try:
        values = _values(vr, value, encoding)
    except (UnicodeDecodeError, struct.error):
        return None
    if values is None:
        return None
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _vr(raw: RawDataElement) -> str | None:
    if raw.VR is not None and not raw.is_implicit_VR:
        vr = str(raw.VR)
        return None if vr == "UN" else vr  # pydicom may replace UN with the dictionary's VR
    tag = raw.tag
    if tag.is_private or tag.element == 0:
        return None
    try:
        vr = str(dictionary_VR(tag))
    except KeyError:
        return None
    return None if " or " in vr else vr  # ambiguous: pydicom resolves it from other elements


def _values(vr: str, value: bytes, encoding: str) -> list[Any] | None:  # noqa: PLR0911 - one case per VR family
    if vr in NUMBER_FORMATS:
        size = struct.calcsize("<" + NUMBER_FORMATS[vr])
        if len(value) % size:
            return None
        numbers = struct.unpack(f"<{len(value) // size}{NUMBER_FORMATS[vr]}", value)
        if vr in ("FL", "FD"):
            return [n if math.isfinite(n) else None for n in numbers]
        return list(numbers)
    if vr in CODE_VRS or vr == "UI":
        text = value.decode(DEFAULT_ENCODING).rstrip(" \0")
        return text.split("\\") if text else []
    if vr in TEXT_VRS:
        items = [item.rstrip("\0 ") for item in value.decode(encoding).split("\\")]
        return [] if items == [""] else items
    if vr in SINGLE_TEXT_VRS:
        text = value.decode(encoding).rstrip("\0 ")
        return [text] if text else []
    if vr == "IS":
        return _numbers(value, _IS, int)
    if vr == "DS":
        return _numbers(value, _DS, float)
    if vr == "PN":
        name = value.rstrip(b"\0 ")
        if b"\\" in name:
            return None  # several names: pydicom's path
        groups = [group.decode(encoding) for group in name.split(b"=")]
        keys = ("Alphabetic", "Ideographic", "Phonetic")
        return [dict(zip(keys, groups, strict=False))] if name else []
    return None


def _numbers(value: bytes, pattern: re.Pattern[str], kind: type[int] | type[float]) -> list[Any] | None:
    text = value.decode(DEFAULT_ENCODING).rstrip(" \0")
    if not text:
        return []
    items = text.split("\\")
    if not all(pattern.fullmatch(item) for item in items):
        return None  # empty or odd values: pydicom decides
    numbers = [kind(item) for item in items]
    return [n if math.isfinite(n) else None for n in numbers]
