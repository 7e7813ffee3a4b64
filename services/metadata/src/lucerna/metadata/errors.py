"""What a DICOMweb request can get wrong, independent of the HTTP layer that reports it."""

from __future__ import annotations


class DicomWebError(Exception):
    """A request the service refuses, with the HTTP status that says why."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequestError(DicomWebError):
    """A malformed query parameter, matching key, range or frame list (400)."""

    status = 400


class NotFoundError(DicomWebError):
    """An unknown study, series, instance, frame or attribute (404)."""

    status = 404


class NotAcceptableError(DicomWebError):
    """No representation the client accepts can be produced without transcoding (406)."""

    status = 406


class StoredDataError(DicomWebError):
    """Stored bytes are missing, altered or unreadable: the server's fault, not the request's (500)."""

    status = 500
