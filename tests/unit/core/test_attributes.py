import pytest

from lucerna.core.dicom.attributes import derive, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.1.2", "0", "2.25.12345678901234567890"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.02.3", "1..2", "1.2.", "a.b", "1" * 65, None, 12])
def test_invalid_uids(uid: object) -> None:
    assert not is_valid_uid(uid)


def test_derive_normalises_names_numbers_and_skips_aggregates() -> None:
    dataset = {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^John^^"}]},
        "00200011": {"vr": "IS", "Value": [3]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00080061": {"vr": "CS", "Value": ["CT", "PT"]},
        "00100020": {"vr": "LO"},
    }
    assert derive(dataset) == {"PatientName": "DOE^JOHN", "SeriesNumber": 3, "Modality": "CT"}
