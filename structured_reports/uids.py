"""Deterministic UIDs for the objects the node writes.

A run is identified by what went in (study, analysed series, a hash of the input
pixel data) and by the model that ran (a hash of its weights).  Deriving every
UID we create from that identity means a replay of the same run writes the same
series and instances again, so a PACS sees a duplicate instead of a second,
conflicting result.

Why not ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)``: with
``prefix=None`` pydicom 3 ignores ``entropy_srcs`` and returns a random UUID
(``2.25.<uuid4>``), so it is not deterministic.  We therefore build the
``2.25.<uuid>`` form of DICOM PS3.5 Annex B.2 ourselves from a name-based
(SHA-1, version 5) UUID as ISO/IEC 9834-8 allows, which needs no registered
organisation root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from enum import Enum, StrEnum
from typing import Any

from pydicom.uid import UID

logger = logging.getLogger(__name__)

#: Name space of all UIDs this node derives (itself a name-based UUID, so it is
#: reproducible from its URN and not a magic number).
UID_NAMESPACE: uuid.UUID = uuid.uuid5(
    uuid.NAMESPACE_URL, "urn:brain-adapter-dicom-node:derived-uids"
)

#: Prefix of UUID-derived UIDs, DICOM PS3.5 B.2.
_UUID_ROOT = "2.25."


class UidKind(StrEnum):
    """The kinds of object whose UIDs are derived; pass one as the last part."""

    SR_SERIES = "sr-series"
    SR_INSTANCE = "sr-instance"
    PDF_SERIES = "pdf-series"
    PDF_INSTANCE = "pdf-instance"
    TRACKING = "tracking"


def derive_uid(*parts: str) -> UID:
    """Derive a UID deterministically from the identity of a run.

    Parameters
    ----------
    *parts : str
        The identity, e.g. study instance UID, series instance UID, input
        content hash, model weights hash and the object kind (a
        :class:`UidKind` value).  Order matters; the parts are encoded
        unambiguously, so ``("ab", "c")`` and ``("a", "bc")`` differ.

    Returns
    -------
    pydicom.uid.UID
        A valid UID of the form ``2.25.<decimal UUID>`` (at most 44 characters).

    Raises
    ------
    ValueError
        If no part is given or a part is empty.

    Examples
    --------
    >>> derive_uid("1.2.3", "4.5.6", "ab12", "cd34", UidKind.SR_INSTANCE) == \\
    ...     derive_uid("1.2.3", "4.5.6", "ab12", "cd34", UidKind.SR_INSTANCE)
    True
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    values = [p.value if isinstance(p, Enum) else str(p) for p in parts]
    if any(not v for v in values):
        raise ValueError("derive_uid parts must be non-empty strings")
    name = json.dumps(values, separators=(",", ":"))
    derived = UID(f"{_UUID_ROOT}{uuid.uuid5(UID_NAMESPACE, name).int}")
    logger.debug("derived UID %s for kind %s", derived, values[-1])
    return derived


_UID_KINDS: dict[str, tuple[UidKind, UidKind]] = {
    "sr": (UidKind.SR_SERIES, UidKind.SR_INSTANCE),
    "pdf": (UidKind.PDF_SERIES, UidKind.PDF_INSTANCE),
}


def run_identity(study_uid: str, chosen: str | None, input_hash: str, weights_sha256: str, *,
                 preprocessing: str | None = None, outcome: str | None = None,
                 notes: Sequence[Any] = ()) -> tuple[str, ...]:
    """The parts every UID of a run is derived from.

    Parameters
    ----------
    study_uid, chosen, input_hash, weights_sha256 : str
        Study, analysed series (None: none selected), hash of the input and of the model weights.
    preprocessing : str or None, optional
        The preprocessing version the report names: another preprocessing gives another input to the
        model, so another result.
    outcome : str or None, optional
        Outcome of a run that was not analysed: a refusal and a result on the same input must
        never share a UID.
    notes : Sequence, optional
        The notes used (``runs.notes_used``: ids and dates): other notes, other result.

    Returns
    -------
    tuple[str, ...]
        The identity (without the object kind).
    """
    identity = [study_uid, chosen or "no series selected", input_hash, weights_sha256]
    if preprocessing is not None:
        identity.append(f"preprocessing:{preprocessing}")
    if outcome is not None:
        identity.append(f"not-analysed:{outcome}")
    if notes:
        identity.append("notes:" + hashlib.sha256(json.dumps(list(notes), sort_keys=True).encode()).hexdigest())
    return tuple(identity)


def object_uids(identity: Sequence[str], kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of one object kind of a run."""
    series_kind, instance_kind = _UID_KINDS[kind]
    return str(derive_uid(*identity, series_kind)), str(derive_uid(*identity, instance_kind))

