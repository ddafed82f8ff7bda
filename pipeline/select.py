"""Choose the series to analyse with declarative rules (``config/series_selection.toml``).

Two stages: ``[[require]]`` rules reject a series (each failing rule becomes a
reason in its :class:`SeriesDecision`), ``[[score]]`` rules add points; the
accepted series with the highest score (at least ``selection.min_score``) wins,
ties going to more images, then the higher SeriesNumber (a rescan), then the
SeriesInstanceUID.  The rule syntax is documented in the TOML file itself.
"""

from __future__ import annotations

import logging
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from core.errors import ConfigError, NotAnalysed, Outcome

logger = logging.getLogger(__name__)

#: The rules shipped with the node.
DEFAULT_RULES_PATH = Path(__file__).resolve().parent.parent / "config" / "series_selection.toml"

_TESTS = ("equals", "not_equals", "regex", "not_regex", "range", "include_all", "include_any", "exclude_any")
_PLANE_NAMES = {0: "sagittal", 1: "coronal", 2: "axial"}


@dataclass(frozen=True)
class SeriesCandidate:
    """One series of a study, as headers read with ``stop_before_pixels``.

    Parameters
    ----------
    series_instance_uid : str
        SeriesInstanceUID.
    headers : sequence of pydicom.Dataset
        One header per instance (at least one).
    """

    series_instance_uid: str
    headers: Sequence[Dataset]


@dataclass(frozen=True)
class Rule:
    """One rule; see the TOML file for the meaning of the tests."""

    name: str
    attributes: tuple[str, ...]
    equals: tuple[str, ...] = ()
    not_equals: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    not_regex: re.Pattern[str] | None = None
    range: tuple[float, float] | None = None
    include_all: tuple[str, ...] = ()
    include_any: tuple[str, ...] = ()
    exclude_any: tuple[str, ...] = ()
    missing_ok: bool = False
    score: float = 0.0


@dataclass(frozen=True)
class SelectionRules:
    """Parsed selection rules."""

    requirements: tuple[Rule, ...]
    scores: tuple[Rule, ...]
    min_score: float = 0.0


@dataclass(frozen=True)
class SeriesDecision:
    """What the selector thought of one series (auditable, free of patient data).

    Parameters
    ----------
    series_instance_uid : str
    description : str
        SeriesDescription (empty when absent).
    modality : str
    score : float
        Sum of the matching score rules (0 when rejected by a requirement).
    accepted : bool
        True for the chosen series only.
    reasons : list of str
        Failed requirements, or the matched score rules, or why it lost.
    """

    series_instance_uid: str
    description: str
    modality: str
    score: float
    accepted: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    """The chosen series and the decision on every candidate."""

    chosen: SeriesCandidate
    decisions: list[SeriesDecision]


class NoSuitableSeries(NotAnalysed):
    """No series qualifies; ``decisions`` says why each was refused."""

    def __init__(self, reason: str, decisions: list[SeriesDecision]) -> None:
        super().__init__(Outcome.NO_SUITABLE_SERIES, reason)
        self.decisions = decisions


def _strings(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"series selection rule {key!r}: expected a string or a list of strings")


def _rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = set(raw) - {"name", "attribute", "missing_ok", "score", *_TESTS}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    attribute = raw.get("attribute")
    attributes = _strings(attribute, f"{where}.attribute") if attribute else ()
    if not attributes:
        raise ConfigError(f"{where}: 'attribute' is required (a keyword or a list of keywords)")
    if not any(k in raw for k in _TESTS):
        raise ConfigError(f"{where}: needs at least one of {_TESTS}")
    name = str(raw.get("name", " / ".join(attributes)))
    try:
        regex = re.compile(raw["regex"], re.IGNORECASE) if "regex" in raw else None
        not_regex = re.compile(raw["not_regex"], re.IGNORECASE) if "not_regex" in raw else None
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{where}.regex: {exc}") from exc
    bounds = None
    if "range" in raw:
        rng = raw["range"]
        try:
            lo, hi = (float(v) for v in rng)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.range: expected [low, high] numbers or \"inf\"") from exc
        bounds = (lo, hi)
    score = raw.get("score", 0.0)
    if not isinstance(score, (int, float)):
        raise ConfigError(f"{where}.score: expected a number")
    return Rule(name=name, attributes=attributes,
                equals=_strings(raw.get("equals"), f"{where}.equals"),
                not_equals=_strings(raw.get("not_equals"), f"{where}.not_equals"),
                regex=regex, not_regex=not_regex, range=bounds,
                include_all=_strings(raw.get("include_all"), f"{where}.include_all"),
                include_any=_strings(raw.get("include_any"), f"{where}.include_any"),
                exclude_any=_strings(raw.get("exclude_any"), f"{where}.exclude_any"),
                missing_ok=bool(raw.get("missing_ok", False)), score=float(score))


def load_rules(path: Path) -> SelectionRules:
    """Read selection rules from a TOML file.

    Parameters
    ----------
    path : Path
        The rules file (see :data:`DEFAULT_RULES_PATH` for the format).

    Returns
    -------
    SelectionRules

    Raises
    ------
    ConfigError
        If the file is missing, not TOML, or a rule is malformed (the message
        names the rule).
    """
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"series selection rules {path}: {exc}") from exc
    min_score = data.get("selection", {}).get("min_score", 0.0)
    if not isinstance(min_score, (int, float)):
        raise ConfigError("selection.min_score: expected a number")
    requirements = tuple(_rule(r, f"require[{i}]") for i, r in enumerate(data.get("require", [])))
    scores = tuple(_rule(r, f"score[{i}]") for i, r in enumerate(data.get("score", [])))
    if not requirements and not scores:
        raise ConfigError(f"series selection rules {path}: no [[require]] or [[score]] rules")
    return SelectionRules(requirements=requirements, scores=scores, min_score=float(min_score))


def _image_count(headers: Sequence[Dataset]) -> int:
    """Number of 2D images: instances, or frames of multi-frame instances."""
    return sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in headers)


def _shared_orientation(ds: Dataset) -> object:
    """ImageOrientationPatient of an Enhanced MR instance (shared functional groups)."""
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for item in group.get("PlaneOrientationSequence") or []:
            return item.get("ImageOrientationPatient")
    return None


def _orientation(headers: Sequence[Dataset]) -> str | None:
    """Plane of the series from ImageOrientationPatient; "mixed" when images differ."""
    normals = []
    for ds in headers:
        iop = ds.get("ImageOrientationPatient") or _shared_orientation(ds)
        try:
            cosines = np.array([float(v) for v in iop], dtype=np.float64)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return None
        if cosines.shape != (6,):
            return None
        normals.append(np.cross(cosines[:3], cosines[3:]))
    if not normals:
        return None
    first = normals[0]
    if any(np.max(np.abs(n - first)) > 1e-3 for n in normals[1:]):
        return "mixed"
    axis = int(np.argmax(np.abs(first)))
    return _PLANE_NAMES[axis] if abs(first[axis]) > math.cos(math.radians(10)) else "oblique"


def _find(ds: Dataset, keyword: str) -> object:
    """A top-level attribute, else one from an Enhanced instance's shared functional groups."""
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for group in ds.get("SharedFunctionalGroupsSequence") or []:
        for element in group:
            if element.VR != "SQ":
                continue
            for item in element.value:
                nested = item.get(keyword)
                if nested is not None and nested != "":
                    return nested
    return None


def _values(candidate: SeriesCandidate, attributes: Sequence[str]) -> list[str] | None:
    """The first present attribute as a list of strings, or None when none is present."""
    for attribute in attributes:
        values = _attribute_values(candidate, attribute)
        if values is not None:
            return values
    return None


def _attribute_values(candidate: SeriesCandidate, attribute: str) -> list[str] | None:
    if attribute == "@images":
        return [str(_image_count(candidate.headers))]
    if attribute == "@orientation":
        orientation = _orientation(candidate.headers)
        return None if orientation is None else [orientation]
    value = _find(candidate.headers[0], attribute) if candidate.headers else None
    if value is None:
        return None
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    out = []
    for item in items:
        out.append(str(item).strip())
        if isinstance(item, UID) and item.name != str(item):
            out.append(item.name)
    return out


def _number(values: list[str]) -> float | None:
    try:
        return float(values[0])
    except (ValueError, IndexError):
        return None


def _check(rule: Rule, values: list[str] | None) -> bool:
    """True when every test of the rule holds."""
    if values is None:
        return rule.missing_ok
    upper = {v.upper() for v in values}
    text = "\\".join(values)
    checks = [
        not rule.equals or bool(upper & {e.upper() for e in rule.equals}),
        not rule.not_equals or not (upper & {e.upper() for e in rule.not_equals}),
        rule.regex is None or rule.regex.search(text) is not None,
        rule.not_regex is None or rule.not_regex.search(text) is None,
        not rule.include_all or {e.upper() for e in rule.include_all} <= upper,
        not rule.include_any or bool(upper & {e.upper() for e in rule.include_any}),
        not rule.exclude_any or not (upper & {e.upper() for e in rule.exclude_any}),
    ]
    if rule.range is not None:
        number = _number(values)
        checks.append(number is not None and rule.range[0] <= number <= rule.range[1])
    return all(checks)


def _describe(candidate: SeriesCandidate) -> tuple[str, str, int]:
    first = candidate.headers[0] if candidate.headers else Dataset()
    number = first.get("SeriesNumber")
    try:
        series_number = int(number) if number not in (None, "") else -1
    except (TypeError, ValueError):
        series_number = -1
    return str(first.get("SeriesDescription", "")), str(first.get("Modality", "")), series_number


def select_series(candidates: Sequence[SeriesCandidate], rules: SelectionRules) -> Selection:
    """Pick the best series of a study.

    Parameters
    ----------
    candidates : sequence of SeriesCandidate
        Every series of the study.
    rules : SelectionRules
        From :func:`load_rules`.

    Returns
    -------
    Selection
        The winner and a decision for every candidate, in input order.

    Raises
    ------
    NoSuitableSeries
        A :class:`~core.errors.NotAnalysed` with outcome
        ``NO_SUITABLE_SERIES``; its ``decisions`` attribute holds the reasons.
    """
    evaluated: list[tuple[SeriesCandidate, str, str, int, float, list[str], bool]] = []
    for cand in candidates:
        description, modality, series_number = _describe(cand)
        failed = [f"rejected: {r.name}" for r in rules.requirements
                  if not _check(r, _values(cand, r.attributes))]
        matched = [r for r in rules.scores if _check(r, _values(cand, r.attributes))]
        score = 0.0 if failed or not cand.headers else sum(r.score for r in matched)
        if not cand.headers:
            failed.append("rejected: no instances")
        reasons = failed or [f"+{r.score:g} {r.name}" for r in matched]
        eligible = not failed and score >= rules.min_score
        if not failed and not eligible:
            reasons.append(f"rejected: score {score:g} below minimum {rules.min_score:g}")
        evaluated.append((cand, description, modality, series_number, score, reasons, eligible))
    winner = max((e for e in evaluated if e[6]), default=None,
                 key=lambda e: (e[4], _image_count(e[0].headers), e[3], e[0].series_instance_uid))
    decisions = []
    for cand, description, modality, _, score, reasons, ok in evaluated:
        accepted = winner is not None and cand is winner[0]
        if ok and not accepted and winner is not None:
            reasons = [*reasons, f"not chosen: series {winner[0].series_instance_uid} ranks higher"]
        decisions.append(SeriesDecision(cand.series_instance_uid, description, modality, score, accepted, reasons))
    for d in decisions:
        logger.info("series %s: score %.1f accepted=%s (%s)", d.series_instance_uid, d.score, d.accepted,
                    "; ".join(d.reasons))
    if winner is None:
        raise NoSuitableSeries(f"no suitable 3D T1 series ({len(decisions)} series considered)", decisions)
    return Selection(chosen=winner[0], decisions=decisions)
