"""The one error hierarchy of the node.

Every stage raises a :class:`NodeError` (or a subclass); the network edge turns
them into named DIMSE statuses and the run record turns them into an audited
reason.  :class:`NotAnalysed` marks an outcome the radiologist must be told
about ("not analysed: <reason>") rather than a crash.

Messages of :class:`NodeError` are written by us, free of patient identifiers;
messages of other exceptions may quote values read from DICOM headers or
notes, so :func:`audit_traceback` keeps only their type.
"""

from __future__ import annotations

import traceback
from enum import StrEnum


class Outcome(StrEnum):
    """Why a run ended without a result; stored in the audit record."""

    NO_SUITABLE_SERIES = "no_suitable_series"
    INCOMPLETE_SERIES = "incomplete_series"
    QC_FAILED = "qc_failed"
    PROCESSING_ERROR = "processing_error"


class NodeError(Exception):
    """Base class of every error raised by the node's own code."""


class ConfigError(NodeError):
    """A configuration value is missing or invalid; the message names the key."""


class InvalidInstanceError(NodeError):
    """A received DICOM instance cannot be accepted (wrong SOP class, corrupt...)."""


class NotAnalysed(NodeError):  # noqa: N818 - an outcome, not a failure of the node
    """The study cannot be analysed; the radiologist gets this reason in the report.

    Parameters
    ----------
    outcome : Outcome
        The category of the refusal.
    reason : str
        A sentence a radiologist can read, free of patient identifiers.
    """

    def __init__(self, outcome: Outcome, reason: str) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.reason = reason


#: Stands for the message of an exception that is not ours (it may quote header values).
WITHHELD = "(message withheld: not a node error, it may quote patient data)"


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _exception_line(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(exc, NodeError):
        message = str(exc)
        return f"{name}: {message}" if message else name
    return f"{name} {WITHHELD}"


def audit_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` for the audit record and the log, without patient data.

    Every frame (file, line, function, source line) and the type of every
    exception of the chain are kept; a message only when the exception is a
    :class:`NodeError`, whose messages we write.  Local variables and notes
    (``add_note``) are never included.

    Parameters
    ----------
    exc : BaseException
        The exception, with its ``__traceback__``, ``__cause__`` and ``__context__``.

    Returns
    -------
    str
        Text laid out as :func:`traceback.format_exception` lays it out.
    """
    # From ``exc`` back to the first exception; each with the sentence that links it to the one after it.
    chain: list[tuple[BaseException, str]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link = ""
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for item, to_next in reversed(chain):
        if item.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(traceback.extract_tb(item.__traceback__).format())
        parts.append(_exception_line(item) + "\n")
        if to_next:
            parts.append(f"\n{to_next}\n\n")
    return "".join(parts)
