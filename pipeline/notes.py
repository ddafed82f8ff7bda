"""Clinical notes: parse a notes file, choose the notes that belong to a study, join them.

File formats (UTF-8):

- CSV with a header row: ``patient_id, note_date, note_type, text`` required;
  ``note_id, issuer_of_patient_id, accession_number`` optional.
- JSON lines (``.jsonl`` / ``.ndjson``, or any file whose first non-blank
  character is ``{``): one object per line with the same keys.

``note_date`` is ISO ``YYYY-MM-DD`` (``YYYYMMDD`` accepted).  A bad row raises
:class:`~core.errors.NodeError` naming the file's line number, never the
row's content (it may hold patient data).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from core.errors import NodeError

logger = logging.getLogger(__name__)

REQUIRED_FIELDS = ("patient_id", "note_date", "note_type", "text")
OPTIONAL_FIELDS = ("note_id", "issuer_of_patient_id", "accession_number")


@dataclass(frozen=True)
class ClinicalNote:
    """One EHR-like note about a patient.

    Parameters
    ----------
    note_id : str or None
        Identifier of the note in its source system.
    patient_id : str
    issuer_of_patient_id : str or None
    accession_number : str or None
        The imaging order the note was written for, when known.
    note_date : datetime.date
    note_type : str
        E.g. "neurology consult", "memory clinic".
    text : str
    """

    note_id: str | None
    patient_id: str
    issuer_of_patient_id: str | None
    accession_number: str | None
    note_date: date
    note_type: str
    text: str


def _parse_date(value: str) -> date:
    value = value.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return datetime.strptime(value, fmt).date()
        except ValueError:
            continue
    raise ValueError("note_date is not YYYY-MM-DD")


def _note(row: Mapping[str, object], where: str) -> ClinicalNote:
    values: dict[str, str | None] = {}
    for key in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        raw = row.get(key)
        if raw is not None and not isinstance(raw, (str, int)):
            raise NodeError(f"{where}: field {key!r} must be text")
        text = None if raw is None else str(raw).strip()
        values[key] = text or None
    missing = [k for k in REQUIRED_FIELDS if not values[k]]
    if missing:
        raise NodeError(f"{where}: missing {', '.join(missing)}")
    try:
        note_date = _parse_date(str(values["note_date"]))
    except ValueError as exc:
        raise NodeError(f"{where}: {exc}") from exc
    return ClinicalNote(note_id=values["note_id"], patient_id=str(values["patient_id"]),
                        issuer_of_patient_id=values["issuer_of_patient_id"],
                        accession_number=values["accession_number"], note_date=note_date,
                        note_type=str(values["note_type"]), text=str(values["text"]))


def _parse_jsonl(lines: Iterable[str], name: str) -> list[ClinicalNote]:
    notes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NodeError(f"{name} line {number}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise NodeError(f"{name} line {number}: expected a JSON object")
        notes.append(_note(row, f"{name} line {number}"))
    return notes


def _parse_csv(text: str, name: str) -> list[ClinicalNote]:
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = reader.fieldnames or []
    missing = [k for k in REQUIRED_FIELDS if k not in header]
    if missing:
        raise NodeError(f"{name} line 1: header lacks column(s) {', '.join(missing)}")
    notes = []
    for row in reader:
        where = f"{name} line {reader.line_num}"
        if None in row:  # more cells than header columns
            raise NodeError(f"{where}: more cells than header columns")
        if all(not (v or "").strip() for v in row.values()):
            continue
        notes.append(_note(row, where))
    return notes


def parse_notes_file(path: Path) -> list[ClinicalNote]:
    """Read clinical notes from a CSV or JSON-lines file.

    Parameters
    ----------
    path : Path
        The notes file.

    Returns
    -------
    list of ClinicalNote
        In file order.

    Raises
    ------
    NodeError
        If the file cannot be read, or for the first bad row ("<file> line N: ...").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeError(f"cannot read notes file {path.name}: {exc}") from exc
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or text.lstrip().startswith("{")
    notes = _parse_jsonl(text.splitlines(), path.name) if is_jsonl else _parse_csv(text, path.name)
    logger.info("read %d clinical notes from %s", len(notes), path.name)
    return notes


def choose_notes(
    notes: Sequence[ClinicalNote],
    *,
    patient_id: str,
    issuer: str | None,
    study_date: date,
    accession_number: str | None,
    window_days: int,
) -> list[ClinicalNote]:
    """The notes that belong to a study, best first.

    Parameters
    ----------
    notes : sequence of ClinicalNote
    patient_id : str
        The study's PatientID (exact match).
    issuer : str or None
        The study's IssuerOfPatientID; compared only when both it and the
        note's issuer are present.
    study_date : datetime.date
    accession_number : str or None
        The study's AccessionNumber; a note written for it comes first.
    window_days : int
        Notes dated from ``study_date - window_days`` to ``study_date``
        (inclusive) qualify; later notes never do.

    Returns
    -------
    list of ClinicalNote
        Notes for the study's accession number first, then newest first.
    """
    earliest = study_date - timedelta(days=window_days)
    chosen = [n for n in notes
              if n.patient_id == patient_id
              and (not issuer or not n.issuer_of_patient_id or n.issuer_of_patient_id == issuer)
              and earliest <= n.note_date <= study_date]
    chosen.sort(key=lambda n: n.note_date, reverse=True)
    chosen.sort(key=lambda n: not (accession_number and n.accession_number == accession_number))
    return chosen


def format_note_text(notes: Sequence[ClinicalNote]) -> str:
    """Join notes into one text for the text encoder.

    Parameters
    ----------
    notes : sequence of ClinicalNote
        In the order wanted (e.g. from :func:`choose_notes`).

    Returns
    -------
    str
        ``"<date> <type>: <text>"`` per note, separated by blank lines; the
        empty string for no notes.
    """
    return "\n\n".join(f"{n.note_date.isoformat()} {n.note_type}: {' '.join(n.text.split())}" for n in notes)
