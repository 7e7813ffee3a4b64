"""WADO-RS resource URLs (PS3.18 10.4) built from the base URL a request came in on."""

from __future__ import annotations

from urllib.parse import quote

PREFIX = "/dicom-web"


def dicomweb_base(request_base_url: str) -> str:
    """The DICOMweb root for a request's base URL (scheme, host, root path)."""
    return request_base_url.rstrip("/") + PREFIX


def study_url(base: str, study_uid: str) -> str:
    """WADO-RS URL of a study."""
    return f"{base}/studies/{quote(study_uid, safe='')}"


def series_url(base: str, study_uid: str, series_uid: str) -> str:
    """WADO-RS URL of a series."""
    return f"{study_url(base, study_uid)}/series/{quote(series_uid, safe='')}"


def instance_url(base: str, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
    """WADO-RS URL of an instance."""
    return f"{series_url(base, study_uid, series_uid)}/instances/{quote(sop_instance_uid, safe='')}"


def bulkdata_url(base: str, study_uid: str, series_uid: str, sop_instance_uid: str, path: str) -> str:
    """WADO-RS URL of one bulk data element (``path``: tag, or tag/item/tag/... inside sequences)."""
    return f"{instance_url(base, study_uid, series_uid, sop_instance_uid)}/bulkdata/{path}"
