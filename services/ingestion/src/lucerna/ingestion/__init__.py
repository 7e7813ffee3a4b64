"""Lucerna ingestion: DICOM DIMSE SCP (C-ECHO, C-STORE), DICOMweb STOW-RS and study assembly."""
