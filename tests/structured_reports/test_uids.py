"""Tests of structured_reports.uids: deterministic, distinct, valid UIDs."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from structured_reports.uids import UidKind, derive_uid

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
INPUT_HASH = "0f" * 32
WEIGHTS_HASH = "a5" * 32


def test_derive_uid_is_deterministic() -> None:
    first = derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS_HASH, UidKind.SR_INSTANCE)
    again = derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS_HASH, UidKind.SR_INSTANCE)
    assert first == again
    assert isinstance(first, UID)


def test_derive_uid_is_distinct_per_kind_and_input() -> None:
    uids = {derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS_HASH, kind) for kind in UidKind}
    assert len(uids) == len(UidKind)
    other_weights = derive_uid(STUDY, SERIES, INPUT_HASH, "b6" * 32, UidKind.SR_INSTANCE)
    other_input = derive_uid(STUDY, SERIES, "1e" * 32, WEIGHTS_HASH, UidKind.SR_INSTANCE)
    same = derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS_HASH, UidKind.SR_INSTANCE)
    assert len({other_weights, other_input, same}) == 3


def test_derive_uid_encodes_parts_unambiguously() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")


def test_derive_uid_is_a_valid_dicom_uid() -> None:
    uid = derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS_HASH, UidKind.PDF_SERIES)
    assert uid.is_valid
    assert uid.startswith("2.25.")
    assert len(uid) <= 64


def test_derive_uid_kind_enum_equals_its_value() -> None:
    assert derive_uid(STUDY, UidKind.TRACKING) == derive_uid(STUDY, "tracking")


@pytest.mark.parametrize("parts", [(), ("1.2.3", "")])
def test_derive_uid_rejects_empty_parts(parts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="derive_uid"):
        derive_uid(*parts)
