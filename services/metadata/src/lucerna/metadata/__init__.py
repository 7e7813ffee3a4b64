"""Lucerna metadata: DICOMweb QIDO-RS and WADO-RS, free-text study search, search-index maintenance."""
