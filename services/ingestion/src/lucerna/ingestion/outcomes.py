"""What happened to each instance offered for storage, in the terms both transports report.

Failure reasons are the DICOM status codes that C-STORE (PS3.4 B.2.3, PS3.7 C.4) and STOW-RS
(PS3.18 Table I.2-2, Failure Reason (0008,1197)) share, so one outcome maps onto either response.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class FailureReason(enum.IntEnum):
    """Why an instance was not stored."""

    PROCESSING_FAILURE = 0x0110  # a general failure on our side (a store did not answer)
    DUPLICATE_SOP_INSTANCE = 0x0111  # the SOP Instance UID is already stored with different bytes
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH = 0xA900  # required UIDs missing or invalid, or another study than asked for
    CANNOT_UNDERSTAND = 0xC000  # not a DICOM Part-10 instance we can parse


class Disposition(enum.Enum):
    """The fate of one instance."""

    STORED = "stored"
    ALREADY_STORED = "already_stored"  # identical bytes were stored before: nothing changed
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceOutcome:
    """One instance's result; UIDs are those read from it (None when it could not be read)."""

    disposition: Disposition
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_uid: str | None = None
    series_uid: str | None = None
    sha256: str | None = None
    size: int = 0
    failure_reason: FailureReason | None = None
    message: str = ""

    @property
    def succeeded(self) -> bool:
        """Stored now or before: the sender's instance is safely here."""
        return self.disposition is not Disposition.FAILED

    @classmethod
    def failed(
        cls,
        reason: FailureReason,
        message: str,
        *,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> InstanceOutcome:
        """A failure with its reason and a message for the sender."""
        return cls(
            Disposition.FAILED,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            study_uid=study_uid,
            series_uid=series_uid,
            failure_reason=reason,
            message=message,
        )
