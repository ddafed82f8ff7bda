"""What the prior-study Q/R SCU (:mod:`dicom_node.net.qr`) answers: studies, series, retrieve results, errors.

Statuses are named from pynetdicom's Query/Retrieve status tables
(:func:`status_name`), never shown as a bare number; every failure is a
:class:`PriorStudyError` whose :class:`PriorFailure` says what kind it is.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from enum import IntEnum, StrEnum

from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from core.errors import NodeError

_SERVICE_STATUSES = {"C-FIND": QR_FIND_SERVICE_CLASS_STATUS, "C-MOVE": QR_MOVE_SERVICE_CLASS_STATUS,
                     "C-GET": QR_GET_SERVICE_CLASS_STATUS}


class QRStatus(IntEnum):
    """Query/Retrieve statuses the node acts on (PS3.4 C.4)."""

    SUCCESS = 0x0000
    CANCEL = 0xFE00
    PENDING = 0xFF00
    PENDING_OPTIONAL_KEYS = 0xFF01
    SUB_OPERATIONS_WARNING = 0xB000
    MOVE_DESTINATION_UNKNOWN = 0xA801
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORISED = 0x0124


#: Final statuses that say the PACS will not do it (its configuration), not that the data is missing.
REFUSALS = (QRStatus.MOVE_DESTINATION_UNKNOWN, QRStatus.SOP_CLASS_NOT_SUPPORTED, QRStatus.NOT_AUTHORISED)


class PriorFailure(StrEnum):
    """Why no prior study could be had."""

    NO_PRIOR = "no prior"
    NOT_RETRIEVABLE = "prior not retrievable"
    PACS_REFUSED = "PACS refused"
    PACS_UNREACHABLE = "PACS unreachable"
    QUERY_TOO_BROAD = "query too broad"


class PriorStudyError(NodeError):
    """A prior study could not be found or retrieved; ``category`` says why, the message the details."""

    def __init__(self, category: PriorFailure, reason: str, result: RetrieveResult | None = None) -> None:
        super().__init__(f"{category}: {reason}")
        self.category = category
        self.result = result


def status_name(code: int, service: str) -> str:
    """A DIMSE status as text: ``"Move destination unknown (0xA801)"``."""
    category, text = _SERVICE_STATUSES[service].get(code, (code_to_category(code), ""))
    return f"{text or category} (0x{code:04X})"


@dataclass(frozen=True)
class PriorStudy:
    """One study of the patient before the current one (AccessionNumber is shown, never logged)."""

    study_instance_uid: str
    study_date: datetime.date
    study_time: str
    accession_number: str
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class SeriesMatch:
    """One series of a prior that passed the series-level rules; ``score`` ranks them."""

    series_instance_uid: str
    modality: str
    description: str
    series_number: int | None
    instances: int | None
    score: float


@dataclass(frozen=True)
class PriorCandidate:
    """The newest prior with candidate T1 series, best first."""

    study: PriorStudy
    series: tuple[SeriesMatch, ...]


@dataclass(frozen=True)
class RetrieveResult:
    """The final answer to a C-MOVE or C-GET; ``received`` counts what the C-GET ``store`` callback took."""

    method: str
    status: int
    completed: int
    failed: int
    warning: int
    received: int | None = None

    @property
    def status_name(self) -> str:
        """The final status by name."""
        return status_name(self.status, "C-MOVE" if self.method == "move" else "C-GET")

    def __str__(self) -> str:
        return (f"C-{self.method.upper()} {self.status_name}: {self.completed} completed, {self.failed} failed, "
                f"{self.warning} warning sub-operations")
