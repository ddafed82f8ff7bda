"""The one error hierarchy of the node.

Every stage raises a :class:`NodeError` (or a subclass); the network edge turns
them into named DIMSE statuses and the run record turns them into an audited
reason.  :class:`NotAnalysed` marks an outcome the radiologist must be told
about ("not analysed: <reason>") rather than a crash.
"""

from __future__ import annotations

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
