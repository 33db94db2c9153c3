from __future__ import annotations

import pytest

from storage.uids import check_uid, is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "1", "0.0", "1." + "2" * 62])
def test_valid(uid: str) -> None:
    assert check_uid(uid, "SOPInstanceUID") == uid


@pytest.mark.parametrize("uid, rule", [
    ("../../x", "only digits and dots"),
    ("1.2/../../etc", "only digits and dots"),
    ("1..2", "only digits and dots"),
    (".1.2", "only digits and dots"),
    ("1.2.", "only digits and dots"),
    ("1.2 ", "only digits and dots"),
    ("1." + "2" * 63, "longer than 64"),
    ("", "missing or empty"),
    (None, "missing or empty"),
])
def test_invalid_names_attribute_value_and_rule(uid: object, rule: str) -> None:
    with pytest.raises(ValueError) as info:
        check_uid(uid, "StudyInstanceUID")
    assert "'StudyInstanceUID'" in str(info.value) and rule in str(info.value)
    assert not is_valid_uid(uid)


def test_leading_zero_components_only_refused_when_strict() -> None:
    assert check_uid("1.02.3", "UID") == "1.02.3"
    with pytest.raises(ValueError):
        check_uid("1.02.3", "UID", strict=True)
