"""Validate the objects we write against their IOD before they leave the node.

Two external checkers are used, both read-only on a temporary copy:

``dciodvfy`` (dicom3tools)
    Checks the object against its IOD: module presence, Type 1/2/1C/2C
    attributes, enumerated/defined terms, VR and VM.  Every finding is one line
    starting with ``Error - `` or ``Warning - ``; other lines (the IOD name,
    e.g. ``Comprehensive3DSR``) are informational.  Errors are real IOD
    violations (missing Type 1 attribute, invalid enumerated value, value too
    long for its VR ...); warnings are "should" findings (retired or
    non-standard attributes, values that are unusual, attributes a DICOMDIR
    would need ...) that a receiver accepts.
``dsrdump`` (DCMTK), for SR documents only
    dciodvfy does not check the SR content tree; DCMTK's SR reader does
    (relationship content constraints of the SR IOD, value types, codes).  Its
    log lines start with ``W:`` (warning) or ``E:``/``F:`` (error, fatal).

Messages can quote attribute values, so they are returned to the caller but
never logged; the log gets counts and the SOP Instance UID only.

One dciodvfy warning is known not to apply and is set aside (in
:attr:`ValidationResult.accepted`, not :attr:`ValidationResult.warnings`):
"Unrecognized defined term <99...> for ... <Coding Scheme Designator>" for a
local coding scheme (designator beginning with "99", PS3.3 section 8.2) that
the object declares in its Coding Scheme Identification Sequence.  dciodvfy
knows only the standard designators and does not read that sequence; the
check here does, so an undeclared local designator still warns.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from core.errors import NodeError
from structured_reports.types import ReportError

logger = logging.getLogger(__name__)

#: Default locations of the checkers (Debian packages dicom3tools and dcmtk).
DCIODVFY = "/usr/bin/dciodvfy"
DSRDUMP = "/usr/bin/dsrdump"

#: Seconds a checker may run before it counts as failed.
_TIMEOUT_S = 60.0

#: Modality of SR documents, whose content tree dsrdump also checks.
_SR_MODALITY = "SR"


class ValidatorUnavailableError(NodeError):
    """A checker program is not installed or could not be run."""


class ValidationFailed(ReportError):  # noqa: N818 - name fixed by the node's API
    """An object we wrote violates its IOD.

    Parameters
    ----------
    sop_instance_uid : str
        The failing object.
    errors : list[str]
        The checkers' error messages.
    warnings : list[str]
        The checkers' warning messages.
    """

    def __init__(self, sop_instance_uid: str, errors: list[str], warnings: list[str]) -> None:
        summary = "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else "")
        super().__init__(
            f"{sop_instance_uid} failed validation with {len(errors)} error(s): {summary}"
        )
        self.sop_instance_uid = sop_instance_uid
        self.errors = errors
        self.warnings = warnings


@dataclass(frozen=True)
class ValidationResult:
    """Findings of the checkers on one object.

    Attributes
    ----------
    errors : list[str]
        IOD violations, each prefixed by the checker (``dciodvfy: ...``).
    warnings : list[str]
        Findings that do not make the object invalid.
    ok : bool
        True when there is no error.
    accepted : list[str]
        dciodvfy warnings known not to apply (a declared local coding scheme), kept for the record.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ok: bool = True
    accepted: list[str] = field(default_factory=list)


#: Prefix of local (private) Coding Scheme Designators (PS3.3 section 8.2).
LOCAL_DESIGNATOR_PREFIX = "99"


def declared_local_schemes(path: Path) -> set[str]:
    """The local coding scheme designators a file declares in its Coding Scheme Identification Sequence.

    Parameters
    ----------
    path : pathlib.Path
        A DICOM Part 10 file.

    Returns
    -------
    set[str]
        Designators beginning with "99"; empty when the file declares none or cannot be read.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["CodingSchemeIdentificationSequence"])
    except (OSError, InvalidDicomError):
        return set()
    return {str(item.get("CodingSchemeDesignator", "")) for item in ds.get("CodingSchemeIdentificationSequence", [])
            if str(item.get("CodingSchemeDesignator", "")).startswith(LOCAL_DESIGNATOR_PREFIX)}


def _declared_scheme_warning(message: str, declared: set[str]) -> bool:
    """Whether a dciodvfy warning is only its not knowing a declared local coding scheme."""
    return any(message == f"Unrecognized defined term <{designator}> for value 1 of attribute "
                          "<Coding Scheme Designator>" for designator in declared)


def _find(program: str) -> str:
    """Return the path of a checker or raise :class:`ValidatorUnavailableError`."""
    if Path(program).is_file():
        return program
    found = shutil.which(Path(program).name)
    if found is None:
        raise ValidatorUnavailableError(f"{Path(program).name} is not installed")
    return found


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a checker, capturing stdout and stderr."""
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValidatorUnavailableError(f"{Path(command[0]).name} could not run: {exc}") from exc


def parse_dciodvfy(output: str) -> tuple[list[str], list[str]]:
    """Split dciodvfy output into error and warning messages.

    Parameters
    ----------
    output : str
        Combined stdout and stderr of ``dciodvfy``.

    Returns
    -------
    tuple[list[str], list[str]]
        Errors (``Error - ...`` lines) and warnings (``Warning - ...`` lines),
        without the prefix.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith("Error - "):
            errors.append(line.removeprefix("Error - "))
        elif line.startswith("Warning - "):
            warnings.append(line.removeprefix("Warning - "))
    return errors, warnings


def parse_dsrdump(output: str) -> tuple[list[str], list[str]]:
    """Split dsrdump log lines into error and warning messages.

    Parameters
    ----------
    output : str
        stderr of ``dsrdump`` (its log; the dump itself is on stdout).

    Returns
    -------
    tuple[list[str], list[str]]
        Errors (``E:`` and ``F:`` lines) and warnings (``W:`` lines).
    """
    errors: list[str] = []
    warnings: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if line.startswith(("E: ", "F: ")):
            errors.append(line[3:])
        elif line.startswith("W: "):
            warnings.append(line[3:])
    return errors, warnings


def validate_file(path: Path, *, is_sr: bool) -> ValidationResult:
    """Validate a DICOM file with dciodvfy (and dsrdump for SR documents).

    Parameters
    ----------
    path : pathlib.Path
        A DICOM Part 10 file.
    is_sr : bool
        Whether to check the SR content tree with dsrdump too.

    Returns
    -------
    ValidationResult
        The findings.

    Raises
    ------
    ValidatorUnavailableError
        If a checker is missing or cannot run.
    """
    errors: list[str] = []
    warnings: list[str] = []
    accepted: list[str] = []
    declared = declared_local_schemes(path)
    checks = [("dciodvfy", [_find(DCIODVFY), str(path)], lambda r: parse_dciodvfy(r.stdout + "\n" + r.stderr))]
    if is_sr:
        checks.append(("dsrdump", [_find(DSRDUMP), "--log-level", "warn", str(path)],
                       lambda r: parse_dsrdump(r.stderr)))
    for tool, command, parse in checks:
        result = _run(command)
        errs, warns = parse(result)
        errors += [f"{tool}: {m}" for m in errs]
        for message in warns:
            known = tool == "dciodvfy" and _declared_scheme_warning(message, declared)
            (accepted if known else warnings).append(f"{tool}: {message}")
        if result.returncode != 0 and not errs:
            errors.append(f"{tool}: exit status {result.returncode} without message")
    return ValidationResult(errors=errors, warnings=warnings, ok=not errors, accepted=accepted)


def validate_dataset(ds: pydicom.Dataset, workdir: Path | None = None) -> ValidationResult:
    """Write a dataset to a temporary file and validate it.

    Parameters
    ----------
    ds : pydicom.Dataset
        The object to check (an SR, an encapsulated PDF ...); it needs file
        meta information or enough to build it (SOP Class/Instance UID).
    workdir : pathlib.Path or None, optional
        Directory for the temporary file; the system temp dir if None.

    Returns
    -------
    ValidationResult
        The findings.

    Raises
    ------
    ValidatorUnavailableError
        If a checker is missing or cannot run.
    """
    sop_instance_uid = str(ds.get("SOPInstanceUID", "unknown"))
    with tempfile.TemporaryDirectory(dir=workdir, prefix="validate-") as tmp:
        path = Path(tmp) / "object.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        result = validate_file(path, is_sr=ds.get("Modality") == _SR_MODALITY)
    logger.info(
        "validated %s: %d error(s), %d warning(s)",
        sop_instance_uid,
        len(result.errors),
        len(result.warnings),
    )
    return result


def require_valid(ds: pydicom.Dataset, workdir: Path | None = None) -> ValidationResult:
    """Validate a dataset and raise unless it has no error.

    Parameters
    ----------
    ds : pydicom.Dataset
        The object to check.
    workdir : pathlib.Path or None, optional
        Directory for the temporary file.

    Returns
    -------
    ValidationResult
        The findings (warnings only) when the object is valid.

    Raises
    ------
    ValidationFailed
        If a checker reports an error; carries all messages.
    ValidatorUnavailableError
        If a checker is missing or cannot run.
    """
    result = validate_dataset(ds, workdir)
    if not result.ok:
        raise ValidationFailed(str(ds.get("SOPInstanceUID", "unknown")), result.errors, result.warnings)
    return result
