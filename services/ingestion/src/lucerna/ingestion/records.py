"""Part-10 bytes to what the metadata store keeps: identity, header as DICOM JSON, derived fields.

The bytes themselves are never re-encoded: they go to the blob store exactly as received, and the
header is read from them only to describe them.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pydicom.valuerep import PersonName

from lucerna.core.dicom.attributes import derive, is_valid_uid
from lucerna.core.storage.ports import BlobRef, DicomJson, InstanceRecord
from lucerna.ingestion.outcomes import FailureReason
from lucerna.ingestion.raw_values import header_encoding, raw_json

log = logging.getLogger(__name__)

BULK_DATA_BYTES = 1024  # binary values above this stay in the blob only (InstanceRecord's contract)
LARGE_VALUE_BYTES = 64 * 1024  # numeric or text values above this too (e.g. RT contour data), see below
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# PS3.18 F.2.7 lets these VRs be bulk data; a huge one would bloat the record (MongoDB caps a
# document at 16 MiB), so it is kept as {"vr": VR} like binary bulk data.
LARGE_VALUE_VRS = frozenset(
    {"DS", "FD", "FL", "IS", "LT", "SL", "SS", "ST", "SV", "UC", "UL", "US", "UT", "UV"}
)
TEXT_VRS = frozenset({"LT", "ST", "UC", "UT"})
INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
DECIMAL_VRS = frozenset({"DS", "FD", "FL"})
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float/Double Float/Pixel Data
# A VR pydicom could not resolve from the data set's context becomes the first VR it may be.
AMBIGUOUS_VRS = {"US or SS": "US", "OB or OW": "OW", "US or OW": "OW", "US or SS or OW": "OW"}
UNDEFINED_LENGTH = 0xFFFFFFFF
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class InvalidInstanceError(Exception):
    """The bytes are not an instance we can store; carries the failure reason and what could be read."""

    def __init__(
        self,
        reason: FailureReason,
        message: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class ParsedInstance:
    """An instance's identity and header, read from its Part-10 bytes."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    dataset: DicomJson


def parse_instance(data: bytes) -> ParsedInstance:
    """Read a Part-10 instance's header; ``InvalidInstanceError`` when it cannot be stored."""
    try:
        # Values above the bulk data size are read only when wanted, and Pixel Data never is: the
        # header is described without copying the pixels, which stay in the blob as received.
        ds = pydicom.dcmread(BytesIO(data), defer_size=BULK_DATA_BYTES)
        if _transfer_syntax(ds) == DeflatedExplicitVRLittleEndian:
            ds = pydicom.dcmread(BytesIO(data))  # read from the inflated copy: no positions in ``data``
    except Exception as error:
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND, f"not a readable DICOM Part-10 instance: {error}"
        ) from error
    uids = {keyword: _uid(ds, keyword) for keyword in REQUIRED_UIDS}
    readable = {
        "sop_class_uid": uids["SOPClassUID"] if is_valid_uid(uids["SOPClassUID"]) else None,
        "sop_instance_uid": uids["SOPInstanceUID"] if is_valid_uid(uids["SOPInstanceUID"]) else None,
    }
    transfer_syntax = _transfer_syntax(ds)
    if not is_valid_uid(transfer_syntax):
        raise InvalidInstanceError(
            FailureReason.CANNOT_UNDERSTAND,
            "the file meta information has no valid Transfer Syntax UID (0002,0010)",
            **readable,
        )
    for keyword, value in uids.items():
        if value is None:
            raise InvalidInstanceError(
                FailureReason.DATA_SET_DOES_NOT_MATCH, f"{keyword} is missing", **readable
            )
        if not is_valid_uid(value):
            raise InvalidInstanceError(
                FailureReason.DATA_SET_DOES_NOT_MATCH,
                f"{keyword} {value[:80]!r} is not a valid UID",
                **readable,
            )
    truncated = _truncated_element(ds, len(data))
    if truncated is not None:
        raise InvalidInstanceError(FailureReason.CANNOT_UNDERSTAND, truncated, **readable)
    assert transfer_syntax is not None  # checked above; narrows the type
    return ParsedInstance(
        study_uid=uids["StudyInstanceUID"] or "",
        series_uid=uids["SeriesInstanceUID"] or "",
        sop_instance_uid=uids["SOPInstanceUID"] or "",
        sop_class_uid=uids["SOPClassUID"] or "",
        transfer_syntax_uid=transfer_syntax,
        dataset=dataset_json(ds),
    )


def build_record(parsed: ParsedInstance, blob: BlobRef, source: str, received_at: datetime) -> InstanceRecord:
    """The metadata record of a parsed instance whose bytes are stored as ``blob``."""
    return InstanceRecord(
        study_uid=parsed.study_uid,
        series_uid=parsed.series_uid,
        sop_instance_uid=parsed.sop_instance_uid,
        sop_class_uid=parsed.sop_class_uid,
        transfer_syntax_uid=parsed.transfer_syntax_uid,
        sha256=blob.sha256,
        size=blob.size,
        source=source,
        received_at=received_at,
        dataset=parsed.dataset,
        attributes=derive(parsed.dataset),
    )


def _transfer_syntax(ds: Dataset) -> str | None:
    meta = getattr(ds, "file_meta", None)
    return _uid(meta, "TransferSyntaxUID") if meta is not None else None


def _uid(ds: Dataset, keyword: str) -> str | None:
    """A single-valued UID as text, or None when absent or empty; malformed values come back as text."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot convert is as good as missing
        return None
    if value is None or value == "":
        return None
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)  # several values: never a valid UID
    return str(value).rstrip("\0 ")


def _truncated_element(ds: Dataset, size: int) -> str | None:
    """Why the bytes end inside the last element, or None.

    pydicom reads a value cut short by the end of the data without complaint (a warning at most),
    and skips a deferred one without looking; an instance whose pixel data lacks its end is not one
    to store.
    """
    if not ds:
        return None
    raw = ds.get_item(list(ds.keys())[-1], keep_deferred=True)  # the last element: where the bytes ended
    if not isinstance(raw, RawDataElement) or raw.length == UNDEFINED_LENGTH:
        return None
    if raw.value is None:  # deferred: only its position was read
        present = max(0, min(raw.length, size - raw.value_tell))
    elif isinstance(raw.value, bytes):
        present = len(raw.value)
    else:
        return None
    if present < raw.length:
        return (
            f"the instance is truncated: element ({raw.tag.group:04X},{raw.tag.element:04X}) declares "
            f"{raw.length} bytes but only {present} follow"
        )
    return None


def dataset_json(ds: Dataset) -> DicomJson:
    """The data set in the DICOM JSON model without bulk data, NaN or infinities.

    Elements whose value pydicom cannot convert are left out (the bytes keep them); the command
    and file meta groups are not part of the data set.
    """
    return _dataset_json(ds, header_encoding(ds))


def _dataset_json(ds: Dataset, encoding: str | None) -> DicomJson:
    out: DicomJson = {}
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset yields converted elements, not tags
        if tag.group in (0x0000, 0x0002):
            continue
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            described = None
            if isinstance(raw, RawDataElement):
                bulk = _deferred_bulk_vr(raw)
                if bulk:
                    described = {"vr": bulk}
                elif encoding:
                    described = raw_json(raw, encoding, BULK_DATA_BYTES)
            out[f"{tag:08X}"] = described or _element_json(ds[tag], encoding)
        except Exception as error:  # noqa: BLE001 - one bad element must not lose the whole record
            log.debug("element %08X left out of the record: %s", tag, error)
    return out


def _deferred_bulk_vr(raw: RawDataElement) -> str | None:
    """The VR of a deferred (unread) element that is bulk data whatever its value, else None."""
    if raw.value is not None:
        return None
    if raw.tag in PIXEL_DATA_TAGS:
        if raw.is_implicit_VR:  # the VR pydicom gives it: OB encapsulated, else OW (PS3.5 A.4, A.1)
            if raw.tag != 0x7FE00010:
                return str(dictionary_VR(raw.tag))  # Float / Double Float Pixel Data: OF, OD
            return "OB" if raw.length == UNDEFINED_LENGTH else "OW"
        return None if raw.VR is None or raw.VR in AMBIGUOUS_VRS else str(raw.VR)
    if raw.VR in BINARY_VRS and raw.VR != "UN":  # UN may turn out to be text once its VR is known
        return str(raw.VR)
    return None


def _element_json(elem: DataElement, encoding: str | None) -> dict[str, Any]:
    vr = str(AMBIGUOUS_VRS.get(elem.VR, elem.VR))  # plain text, not pydicom's VR enum
    if vr == "SQ":
        items = [_dataset_json(item, header_encoding(item, encoding)) for item in elem.value or ()]
        return {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
    if vr in BINARY_VRS or elem.tag in PIXEL_DATA_TAGS:
        value = elem.value
        if not value or elem.tag in PIXEL_DATA_TAGS or len(value) > BULK_DATA_BYTES:
            return {"vr": vr}
        if not isinstance(value, bytes):
            raise TypeError(f"binary element with a {type(value).__name__} value")
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    values = _values(elem.value)
    if not values or (vr in LARGE_VALUE_VRS and _too_large(elem, vr)):
        return {"vr": vr}
    return {"vr": vr, "Value": _json_values(vr, values)}


def _json_values(vr: str, values: list[Any]) -> list[Any]:
    """The DICOM JSON value forms (PS3.18 F.2.3), as pydicom's ``to_json_dict`` gives them, made plain."""
    if vr == "PN":
        return [_person_name(v) for v in values]
    if vr == "AT":
        return [format(v, "08X") for v in values]
    if vr in INTEGER_VRS:
        return [None if v is None else int(v) for v in values]
    if vr in DECIMAL_VRS:
        return [None if v is None else _json_value(float(v)) for v in values]
    return [_json_value(v) for v in values]


def _values(value: Any) -> list[Any]:
    """An element's values as a list; empty when it has none (pydicom's VM 0)."""
    if value is None:
        return []
    if isinstance(value, str | bytes | PersonName):
        return [value] if value else []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _person_name(value: PersonName) -> dict[str, str]:
    groups = zip(("Alphabetic", "Ideographic", "Phonetic"), value.components, strict=False)
    return {group: _utf8(str(text)) for group, text in groups}


def _too_large(elem: DataElement, vr: str) -> bool:
    if vr in TEXT_VRS:
        return isinstance(elem.value, str) and len(elem.value) > LARGE_VALUE_BYTES
    return elem.VM * 8 > LARGE_VALUE_BYTES  # at most 8 bytes (or 16 characters of DS) per value


def _json_value(value: Any) -> Any:
    """A value as plain JSON: finite numbers (FerretDB refuses NaN), valid UTF-8 text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return _utf8(value)
    raise TypeError(f"no JSON form for a {type(value).__name__} value")


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text
