"""Golden UIDs of a fixed run identity, and every input of the identity changes them.

The expected UIDs below are literals committed with the test, not values the test
computes: a change of the derivation (name-based UUID version, name space, encoding
of the parts, order of the identity) changes the UIDs the node writes for a replayed
run, so a PACS would file a second, conflicting result.  Such a change must fail
here, loudly, and be made on purpose.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from enum import Enum
from typing import Any

import pytest

from structured_reports.uids import UID_NAMESPACE, UidKind, derive_uid, object_uids, run_identity

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
INPUT_HASH = "0f" * 32
WEIGHTS = "a5" * 32
PREPROCESSING = "1.0"
NOTES = [{"id": 7, "date": "2024-03-01", "type": "memory clinic"}]

#: The identity of a fixed analysed run without notes.
IDENTITY = (STUDY, SERIES, INPUT_HASH, WEIGHTS, "preprocessing:1.0")

GOLDEN = {
    "sr": ("2.25.184793853223462937387473210106990782841", "2.25.97414462911360471000118146008427327788"),
    "pdf": ("2.25.239821469122751188034207668911193417968", "2.25.316808624254303016713012224949784576902"),
}


def _analysed(**change: Any) -> tuple[str, ...]:
    values: dict[str, Any] = {"study_uid": STUDY, "chosen": SERIES, "input_hash": INPUT_HASH,
                              "weights_sha256": WEIGHTS, "preprocessing": PREPROCESSING, "notes": NOTES}
    values.update(change)
    return run_identity(**values)


def test_the_name_space_is_the_published_one() -> None:
    assert uuid.UUID("9ef6abaa-f1aa-5b84-885d-357d42de21aa") == UID_NAMESPACE
    assert UID_NAMESPACE.version == 5


def test_golden_uids_of_a_fixed_run_identity() -> None:
    identity = run_identity(STUDY, SERIES, INPUT_HASH, WEIGHTS, preprocessing=PREPROCESSING,
                            notes=[{"id": 7, "date": "2024-03-01"}])
    assert identity[:5] == (STUDY, SERIES, INPUT_HASH, WEIGHTS, "preprocessing:1.0")
    assert identity[5] == "notes:640a8ec2cb8ca052b0088c7151b6b2caa3404ede63da1276ab6c1c1161f36a20"
    assert object_uids(identity, "sr") == GOLDEN["sr"]
    assert object_uids(identity, "pdf") == GOLDEN["pdf"]


def test_golden_uids_of_derive_uid() -> None:
    assert derive_uid(STUDY, SERIES, INPUT_HASH, WEIGHTS, UidKind.TRACKING) == (
        "2.25.6340567789956632716125251668602452527")
    assert derive_uid("a") == "2.25." + str(uuid.uuid5(UID_NAMESPACE, '["a"]').int)
    assert derive_uid("ab", "c") == "2.25." + str(uuid.uuid5(UID_NAMESPACE, '["ab","c"]').int)


def test_golden_identity_of_a_refusal() -> None:
    identity = run_identity(STUDY, None, INPUT_HASH, WEIGHTS, outcome="no_suitable_series")
    assert identity == (STUDY, "no series selected", INPUT_HASH, WEIGHTS, "not-analysed:no_suitable_series")


def test_the_notes_hash_ignores_key_order_but_not_values() -> None:
    one = run_identity(STUDY, SERIES, INPUT_HASH, WEIGHTS, notes=[{"id": 7, "date": "2024-03-01"}])
    reordered = run_identity(STUDY, SERIES, INPUT_HASH, WEIGHTS, notes=[{"date": "2024-03-01", "id": 7}])
    assert one == reordered
    assert one[-1] == "notes:640a8ec2cb8ca052b0088c7151b6b2caa3404ede63da1276ab6c1c1161f36a20"


CHANGES: dict[str, Callable[[], tuple[str, ...]]] = {
    "study": lambda: _analysed(study_uid="1.2.826.0.1.3680043.8.498.9"),
    "analysed series": lambda: _analysed(chosen="1.2.826.0.1.3680043.8.498.3"),
    "no series selected": lambda: _analysed(chosen=None),
    "input pixels": lambda: _analysed(input_hash="1e" * 32),
    "weights": lambda: _analysed(weights_sha256="b6" * 32),
    "preprocessing version": lambda: _analysed(preprocessing="1.1"),
    "no preprocessing version": lambda: _analysed(preprocessing=None),
    "another note": lambda: _analysed(notes=[{"id": 8, "date": "2024-03-01", "type": "memory clinic"}]),
    "another note date": lambda: _analysed(notes=[{"id": 7, "date": "2024-03-02", "type": "memory clinic"}]),
    "one more note": lambda: _analysed(notes=[*NOTES, {"id": 9, "date": "2023-01-05", "type": "letter"}]),
    "no notes": lambda: _analysed(notes=[]),
    "outcome": lambda: _analysed(outcome="qc_failed"),
    "another outcome": lambda: _analysed(outcome="processing_error"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_input_of_the_identity_changes_every_uid(change: str) -> None:
    base = _analysed()
    changed = CHANGES[change]()
    assert changed != base
    for kind in ("sr", "pdf"):
        before, after = object_uids(base, kind), object_uids(changed, kind)
        assert before[0] != after[0] and before[1] != after[1], kind


def test_the_changed_identities_are_all_distinct() -> None:
    uids = {object_uids(make(), "sr")[1] for make in CHANGES.values()} | {object_uids(_analysed(), "sr")[1]}
    assert len(uids) == len(CHANGES) + 1


def test_a_refusal_and_a_result_never_share_a_uid() -> None:
    refused = _analysed(outcome="qc_failed")
    assert "not-analysed:qc_failed" in refused
    assert object_uids(refused, "sr") != object_uids(_analysed(), "sr")


def test_series_and_instance_and_kinds_differ() -> None:
    sr, pdf = object_uids(IDENTITY, "sr"), object_uids(IDENTITY, "pdf")
    assert len({*sr, *pdf}) == 4
    with pytest.raises(KeyError, match="keyslices"):
        object_uids(IDENTITY, "keyslices")


class PlainKind(Enum):
    """A kind that is an Enum but not a str."""

    SR = "sr-series"


def test_an_enum_part_counts_by_its_value() -> None:
    assert derive_uid(STUDY, PlainKind.SR) == derive_uid(STUDY, "sr-series")  # type: ignore[arg-type]


def test_empty_identities_are_refused_with_their_reason() -> None:
    with pytest.raises(ValueError, match=r"^derive_uid needs at least one part$"):
        derive_uid()
    with pytest.raises(ValueError, match=r"^derive_uid parts must be non-empty strings$"):
        derive_uid(STUDY, "")
