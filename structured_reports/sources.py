"""The source instances as the SR refers to them: its representative image and the copied modules.

The SR names the analysed series by one representative IMAGE item
(:func:`representative_image`) and copies the patient and study modules from
the first source instance, with missing Type 2 attributes empty
(:func:`with_type2_defaults`).  :mod:`structured_reports.sr` imports both
names, so ``from structured_reports.sr import representative_image`` keeps
working.
"""

from __future__ import annotations

from collections.abc import Sequence

import pydicom

#: Type 2 patient/study attributes highdicom reads from the first source; a
#: scanner may omit them, so they default to empty (as Type 2 allows).
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def with_type2_defaults(source: pydicom.Dataset) -> pydicom.Dataset:
    """A shallow copy of ``source`` with missing Type 2 patient/study attributes empty.

    Parameters
    ----------
    source : pydicom.Dataset
        The instance whose patient and study modules the report copies.

    Returns
    -------
    pydicom.Dataset
        ``source`` itself when nothing is missing, else a copy with the missing
        attributes present and empty.
    """
    missing = [keyword for keyword in _TYPE2_PATIENT_STUDY if keyword not in source]
    if not missing:
        return source
    patched = pydicom.Dataset()
    patched.update(source)
    if hasattr(source, "file_meta"):
        patched.file_meta = source.file_meta
    for keyword in missing:
        setattr(patched, keyword, "")
    return patched


def _instance_number(ds: pydicom.Dataset) -> int:
    """Instance Number as an int (0 when absent or empty)."""
    value = ds.get("InstanceNumber")
    return int(value) if value is not None and str(value) != "" else 0


def representative_image(sources: Sequence[pydicom.Dataset]) -> pydicom.Dataset:
    """The middle instance of the analysed series, by Instance Number.

    The measurement group names its source by this one IMAGE item: one line
    per slice (a 3D T1 has ~180) would drown the result in ``dsrdump`` and
    ``dsr2html``.  Every instance is still in the evidence sequence, and the
    series is named in a text item.

    Parameters
    ----------
    sources : Sequence[pydicom.Dataset]
        Instances of the analysed series (at least one).

    Returns
    -------
    pydicom.Dataset
        The instance at the middle position.
    """
    ordered = sorted(sources, key=_instance_number)
    return ordered[len(ordered) // 2]
