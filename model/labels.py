"""The labelled cohort a hospital gives ``dicom-node cohort prepare``: one row per scan.

Columns (CSV with a header; extra columns are ignored):

``scan_id``     unique per row
``subject_id``  the patient (pseudonymised); all of a subject's scans stay on one side of a split
``label``       the diagnosis at this scan: AD, MCI or CN, or a name a converter maps to one
                (:data:`LABEL_ALIASES`, plus ``--label-map FROM=TO``)
``scan_date``   ISO date (YYYY-MM-DD or YYYYMMDD)
``note``        optional clinical note (empty: image only)
``path``        a DICOM folder (one study) or a NIfTI file, relative to the CSV's folder unless absolute

Bad rows are refused all at once, each named by its line, before any scan is
processed.  Nothing here logs a row's content.
"""

from __future__ import annotations

import csv
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from model.errors import ModelInputError
from model.types import CLASSES

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ("scan_id", "subject_id", "label", "scan_date", "path")

#: Built-in label converters (case-insensitive): ADNI's diagnosis names and common spellings.
LABEL_ALIASES: dict[str, str] = {
    "ad": "AD", "dementia": "AD", "alzheimer's disease": "AD", "alzheimers disease": "AD",
    "mci": "MCI", "emci": "MCI", "lmci": "MCI", "mild cognitive impairment": "MCI",
    "cn": "CN", "nc": "CN", "normal": "CN", "control": "CN", "cognitively normal": "CN",
}

#: How many bad rows one error message names.
MAX_REPORTED = 20


@dataclass(frozen=True)
class LabelRow:
    """One scan of the labels file.

    Parameters
    ----------
    line : int
        Line in the CSV (the header is line 1).
    scan_id, subject_id : str
        Identifiers.
    label : str
        One of :data:`model.types.CLASSES` (after conversion).
    scan_date : str
        ISO date (YYYY-MM-DD).
    note : str
        Clinical note ("" for none).
    source : Path
        Absolute path of the DICOM folder or NIfTI file.
    """

    line: int
    scan_id: str
    subject_id: str
    label: str
    scan_date: str
    note: str
    source: Path


def parse_label_map(items: list[str] | None) -> dict[str, str]:
    """``FROM=TO`` pairs (``--label-map``) as a converter table.

    Parameters
    ----------
    items : list of str or None
        Pairs such as ``"Dementia=AD"``.

    Returns
    -------
    dict
        Lower-cased name to class.

    Raises
    ------
    ModelInputError
        When a pair is malformed or maps to an unknown class.
    """
    table: dict[str, str] = {}
    for item in items or []:
        name, sep, target = item.partition("=")
        if not sep or not name.strip() or target.strip() not in CLASSES:
            raise ModelInputError(f"--label-map needs FROM=TO with TO one of {CLASSES}, got {item!r}")
        table[name.strip().lower()] = target.strip()
    return table


def convert_label(value: str, label_map: Mapping[str, str] | None = None) -> str | None:
    """The class a label names, or None.

    Parameters
    ----------
    value : str
        The label as written.
    label_map : Mapping, optional
        Extra converters (lower-case name to class), taking precedence over :data:`LABEL_ALIASES`.

    Returns
    -------
    str or None
        One of :data:`model.types.CLASSES`, or None when unknown.
    """
    key = value.strip().lower()
    if label_map and key in label_map:
        return label_map[key]
    if value.strip() in CLASSES:
        return value.strip()
    return LABEL_ALIASES.get(key)


def _date(value: str) -> str | None:
    text = value.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, fmt).date().isoformat()
        except ValueError:
            continue
    return None


def read_labels(path: Path, label_map: Mapping[str, str] | None = None) -> list[LabelRow]:
    """Read and validate the labels file.

    Parameters
    ----------
    path : Path
        The CSV.
    label_map : Mapping, optional
        Extra label converters (:func:`parse_label_map`).

    Returns
    -------
    list of LabelRow
        The scans in file order.

    Raises
    ------
    ModelInputError
        When the file is missing or empty, lacks a column, or has bad rows (unknown
        label, bad date, empty identifier, repeated scan id); every bad row is named.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"labels file not found: {path}")
    rows: list[LabelRow] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ModelInputError(f"labels file {path} lacks the column(s) {', '.join(missing)}")
        for line, raw in enumerate(reader, start=2):
            row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
            label = convert_label(row["label"], label_map)
            date = _date(row["scan_date"])
            bad = [f"{c} is empty" for c in ("scan_id", "subject_id", "path") if not row[c]]
            if label is None:
                bad.append(f"label {row['label']!r} is not one of {CLASSES} (add --label-map FROM=TO)")
            if date is None:
                bad.append(f"scan_date {row['scan_date']!r} is not a date (YYYY-MM-DD)")
            if row["scan_id"] in seen:
                bad.append(f"scan_id repeats line {seen[row['scan_id']]}")
            seen.setdefault(row["scan_id"], line)
            if bad:
                problems.append(f"line {line}: " + "; ".join(bad))
                continue
            source = Path(row["path"])
            rows.append(LabelRow(line, row["scan_id"], row["subject_id"], str(label), str(date),
                                 raw.get("note") or "", source if source.is_absolute() else path.parent / source))
    if problems:
        more = f" (and {len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise ModelInputError(f"labels file {path} has {len(problems)} bad row(s){more}:\n  "
                              + "\n  ".join(problems[:MAX_REPORTED]))
    if not rows:
        raise ModelInputError(f"labels file {path} has no rows")
    return rows
