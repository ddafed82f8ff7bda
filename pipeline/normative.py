"""Normative brain volumes: a configured table of population means and SDs, and z-scores against it.

A pure module (no network, no database).  The node compares a patient's volumes with a
population only when such a table is configured, and every report names the table's
source; without one, the reports say "no normative data configured" and give no
z-score or percentile (docs/volumetry.md).

File format (CSV, UTF-8)
------------------------
::

    # source: <who measured it, on which cohort, with which method: the reports quote it>
    structure,sex,age_min,age_max,mean_ml,sd_ml
    hippocampus_left,F,60,70,7.41,0.62
    hippocampus_left,any,70,80,7.10,0.70

- The first line is ``# source: ...`` with a non-empty text; a table without it is refused.
- Then a header naming exactly the six columns (any order); further lines starting with ``#``
  and blank lines are ignored.
- ``structure``: one of :data:`STRUCTURES` (the stems of :class:`pipeline.volumetry.Volumes`'
  ``*_ml`` fields).
- ``sex``: ``M``, ``F`` or ``any`` (a row for the patient's sex is preferred to an ``any`` row).
- ``age_min``, ``age_max``: years, ``age_min <= age < age_max`` (so ``60,70`` then ``70,80``);
  rows of one structure and sex must not overlap.
- ``mean_ml``, ``sd_ml``: the population's mean and standard deviation, in ml, both > 0.

The values must have been measured with this node's method (pipeline/volumetry.py: AAL's
hippocampus is larger than manual tracing protocols'): another tool's norms give wrong z-scores.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from core.errors import ConfigError

logger = logging.getLogger(__name__)

#: The structures a table may list: the stems of ``Volumes``' ``*_ml`` fields.
STRUCTURES = ("hippocampus_left", "hippocampus_right", "lateral_ventricles", "grey_matter", "white_matter",
              "intracranial")

#: The values of the ``sex`` column.
SEXES = ("M", "F", "any")

#: The columns of the table, after its ``# source:`` line.
COLUMNS = ("structure", "sex", "age_min", "age_max", "mean_ml", "sd_ml")

_SOURCE_PREFIX = "# source:"


class NormativeTableError(ConfigError):
    """A normative table cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class NormativeRow:
    """One line of a normative table: a structure's mean and SD in a sex and age band.

    Parameters
    ----------
    structure : str
        One of :data:`STRUCTURES`.
    sex : str
        ``"M"``, ``"F"`` or ``"any"``.
    age_min, age_max : float
        The age band in years, ``age_min <= age < age_max``.
    mean_ml, sd_ml : float
        The population's mean and standard deviation (ml).
    """

    structure: str
    sex: str
    age_min: float
    age_max: float
    mean_ml: float
    sd_ml: float

    def contains(self, age: float) -> bool:
        """Whether *age* (years) lies in this row's band."""
        return self.age_min <= age < self.age_max

    def describe(self) -> str:
        """The row's population in words: ``"female, age 60-70 years"``."""
        sex = {"M": "male", "F": "female"}.get(self.sex, "both sexes")
        return f"{sex}, age {self.age_min:g}-{self.age_max:g} years"


@dataclass(frozen=True)
class NormativeTable:
    """A normative table with its stated source (see the module docstring for the file format).

    Parameters
    ----------
    source : str
        Where the values come from (quoted by the reports).
    rows : tuple of NormativeRow
        The table's lines.
    """

    source: str
    rows: tuple[NormativeRow, ...]

    @classmethod
    def load(cls, path: Path) -> NormativeTable:
        """Read and check a table file.

        Parameters
        ----------
        path : pathlib.Path
            The CSV file.

        Returns
        -------
        NormativeTable
            Its source and rows.

        Raises
        ------
        NormativeTableError
            If the file cannot be read, has no ``# source:`` first line, lacks a column, or a line
            has an unknown structure or sex, a number that is not one, an empty age band, a mean or
            SD not above 0, or overlaps another line's band (the message names the line).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise NormativeTableError(f"normative table {path}: cannot be read ({type(exc).__name__})") from exc
        table = cls.parse(text, name=str(path))
        logger.info("normative table %s: %d rows, source %r", path, len(table.rows), table.source)
        return table

    @classmethod
    def parse(cls, text: str, name: str = "<normative table>") -> NormativeTable:
        """Parse the text of a table file (see :meth:`load`, which names the file in its errors)."""
        lines = text.splitlines()
        first = lines[0].strip() if lines else ""
        if not first.lower().startswith(_SOURCE_PREFIX):
            raise NormativeTableError(
                f"normative table {name} line 1: must be '{_SOURCE_PREFIX} <where the values come from>' "
                "(a table without a stated source is not used)")
        source = first[len(_SOURCE_PREFIX):].strip()
        if not source:
            raise NormativeTableError(f"normative table {name} line 1: the source is empty")
        numbered = [(number, line) for number, line in enumerate(lines[1:], start=2)
                    if line.strip() and not line.lstrip().startswith("#")]
        if not numbered:
            raise NormativeTableError(f"normative table {name}: no header line ({','.join(COLUMNS)})")
        header_number, header_line = numbered[0]
        header = [column.strip() for column in next(csv.reader(io.StringIO(header_line)))]
        if sorted(header) != sorted(COLUMNS):
            raise NormativeTableError(
                f"normative table {name} line {header_number}: the columns must be {','.join(COLUMNS)} "
                f"(found {','.join(header)})")
        rows = tuple(_row(header, _fields(line), f"normative table {name} line {number}")
                     for number, line in numbered[1:])
        if not rows:
            raise NormativeTableError(f"normative table {name}: no rows after the header")
        _check_overlaps(rows, numbered[1:], name)
        return cls(source=source, rows=rows)

    def reference(self, structure: str, age: float | None, sex: str | None) -> NormativeRow | None:
        """The row for a patient: the patient's sex preferred to ``any``; None when none applies.

        Parameters
        ----------
        structure : str
            One of :data:`STRUCTURES`.
        age : float or None
            The patient's age in years at the study (None: unknown, so no row applies).
        sex : str or None
            PatientSex (``"M"``, ``"F"``; anything else matches only ``any`` rows).

        Returns
        -------
        NormativeRow or None
            The matching row.
        """
        if age is None or not math.isfinite(age):
            return None
        candidates = [row for row in self.rows if row.structure == structure and row.contains(age)]
        for wanted in ((sex or "").strip().upper(), "any"):
            for row in candidates:
                if row.sex == wanted:
                    return row
        return None

    def z_score(self, structure: str, age: float | None, sex: str | None, ml: float) -> float | None:
        """``(ml - mean) / sd`` against the patient's row; None when no row applies.

        Parameters
        ----------
        structure : str
            One of :data:`STRUCTURES`.
        age : float or None
            Age in years at the study.
        sex : str or None
            PatientSex.
        ml : float
            The measured volume.

        Returns
        -------
        float or None
            The z-score.
        """
        row = self.reference(structure, age, sex)
        return None if row is None else (ml - row.mean_ml) / row.sd_ml

    def percentile(self, structure: str, age: float | None, sex: str | None, ml: float) -> float | None:
        """The percentile (0-100) of *ml* under a normal distribution of the row's mean and SD; None without a row."""
        z = self.z_score(structure, age, sex, ml)
        return None if z is None else percentile_of_z(z)


def percentile_of_z(z: float) -> float:
    """The percentile (0-100) of a z-score under the standard normal distribution."""
    return 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _fields(line: str) -> list[str]:
    return [field.strip() for field in next(csv.reader(io.StringIO(line)))]


def _number(values: dict[str, str], column: str, where: str) -> float:
    text = values.get(column, "")
    try:
        value = float(text)
    except ValueError:
        raise NormativeTableError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise NormativeTableError(f"{where}: {column} {text!r} is not a finite number")
    return value


def _row(header: list[str], fields: list[str], where: str) -> NormativeRow:
    """One checked row (*where* names file and line in the errors)."""
    if len(fields) != len(header):
        raise NormativeTableError(f"{where}: {len(fields)} fields, expected {len(header)}")
    values = dict(zip(header, fields, strict=True))
    structure = values["structure"]
    if structure not in STRUCTURES:
        raise NormativeTableError(f"{where}: unknown structure {structure!r} (expected one of {', '.join(STRUCTURES)})")
    sex = values["sex"].upper() if values["sex"].upper() in ("M", "F") else values["sex"].lower()
    if sex not in SEXES:
        raise NormativeTableError(f"{where}: sex {values['sex']!r} is not M, F or any")
    age_min, age_max = _number(values, "age_min", where), _number(values, "age_max", where)
    mean_ml, sd_ml = _number(values, "mean_ml", where), _number(values, "sd_ml", where)
    if not 0.0 <= age_min < age_max:
        raise NormativeTableError(f"{where}: the age band {age_min:g}-{age_max:g} is empty or negative")
    if mean_ml <= 0.0 or sd_ml <= 0.0:
        raise NormativeTableError(f"{where}: mean_ml and sd_ml must be above 0 (found {mean_ml:g}, {sd_ml:g})")
    return NormativeRow(structure, sex, age_min, age_max, mean_ml, sd_ml)


def _check_overlaps(rows: tuple[NormativeRow, ...], numbered: list[tuple[int, str]], name: str) -> None:
    """Refuse two rows of one structure and sex whose age bands overlap (which one would apply?)."""
    for index, row in enumerate(rows):
        for other_index in range(index):
            other = rows[other_index]
            if (other.structure, other.sex) == (row.structure, row.sex) and \
                    row.age_min < other.age_max and other.age_min < row.age_max:
                raise NormativeTableError(
                    f"normative table {name} line {numbered[index][0]}: the age band {row.age_min:g}-{row.age_max:g} "
                    f"of {row.structure} ({row.sex}) overlaps line {numbered[other_index][0]}")
