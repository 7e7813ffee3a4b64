"""FHIR service settings from ``LUCERNA_FHIR_*`` environment variables."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AnyHttpUrl, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lucerna.fhir import codes
from lucerna.fhir.publishing import PublishingSettings


class FhirSettings(BaseSettings):
    """How results are published: identifier systems, links, time zone; and consumer sizing."""

    model_config = SettingsConfigDict(env_prefix="LUCERNA_FHIR_", extra="ignore")

    # The system of Patient.identifier for a DICOM PatientID (a site sets its MRN system).
    patient_identifier_system: str = codes.DEFAULT_PATIENT_ID_SYSTEM
    # DICOM Issuer of Patient ID -> identifier system, as JSON: {"HOSP A": "urn:oid:1.2.3"}.
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    # Where hospital systems retrieve the images (ImagingStudy.endpoint): the DICOMweb base URL.
    dicomweb_base_url: str = "http://127.0.0.1:8080/dicom-web"
    platform_name: str = "Lucerna"
    # The zone of DICOM study times sent without TimezoneOffsetFromUTC (IANA name).
    site_timezone: str = "UTC"
    # Events handled at once per consumed queue.
    prefetch: int = Field(default=8, ge=1)
    # The hospital's FHIR server (its base URL): every published transaction is pushed there too.
    push_url: AnyHttpUrl | None = None
    # A bearer token for that server, if it wants one (never logged).
    push_token: SecretStr | None = None
    # Deliveries (pushes, notifications): first retry after this, doubling up to the cap.
    delivery_retry_seconds: float = Field(default=2.0, gt=0)
    delivery_retry_max_seconds: float = Field(default=300.0, gt=0)
    delivery_timeout_seconds: float = Field(default=10.0, gt=0)
    delivery_interval_seconds: float = Field(default=1.0, gt=0)
    # The public base URL of this FHIR API (``https://host/fhir``): links, and the references that
    # Subscription notifications carry (relative ones when unset: no request tells the notifier).
    base_url: AnyHttpUrl | None = None

    @field_validator("site_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as Europe/Zurich)") from error
        return value

    def publishing(self) -> PublishingSettings:
        """The publishing model's settings."""
        return PublishingSettings(
            patient_identifier_system=self.patient_identifier_system,
            issuer_systems=dict(self.issuer_systems),
            dicomweb_base_url=self.dicomweb_base_url,
            platform_name=self.platform_name,
        )
