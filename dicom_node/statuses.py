"""Named DIMSE statuses and association results (PS3.4 Annex B, PS3.7 Annex C, PS3.8 9.3.4)."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses used by the node's Storage SCP."""

    SUCCESS = 0x0000
    WARNING_COERCION = 0xB000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    #: Lossy-compressed input while ``storage.accept_lossy`` is false (in the
    #: "Error: Cannot understand" range Cxxx, which every SCU treats as a failure).
    LOSSY_INPUT_REFUSED = 0xC001


class VerificationStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result field."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source field."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. values used by the node (for source 1 and 3)."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNIZED = 0x03
    CALLED_AE_NOT_RECOGNIZED = 0x07
    TEMPORARY_CONGESTION = 0x01  # source 3
    LOCAL_LIMIT_EXCEEDED = 0x02  # source 3


class FailureClass(StrEnum):
    """How an outgoing association or C-STORE failed; decides whether to retry."""

    REJECTED_PERMANENT = "rejected_permanent"
    REJECTED_TRANSIENT = "rejected_transient"
    OUT_OF_RESOURCES = "out_of_resources"
    FAILURE_STATUS = "failure_status"
    TIMEOUT = "timeout"
    CONNECTION_REFUSED = "connection_refused"
    ABORTED = "aborted"
    LOCAL_ERROR = "local_error"

    @property
    def permanent(self) -> bool:
        """True when sending the same object again cannot succeed without a change of configuration."""
        return self in (FailureClass.REJECTED_PERMANENT, FailureClass.FAILURE_STATUS, FailureClass.LOCAL_ERROR)


def is_success(status: int | None) -> bool:
    """True for Success."""
    return status == StoreStatus.SUCCESS


def is_warning(status: int | None) -> bool:
    """True for the Warning statuses of the Storage Service Class (0x0001, 0xBxxx)."""
    return status is not None and (status == 0x0001 or 0xB000 <= status <= 0xBFFF)


def classify_store_status(status: int) -> FailureClass | None:
    """The failure class of a C-STORE response status; None for Success and Warnings.

    ``0xA7xx`` (Out of Resources) is transient; every other failure status
    (``0xA9xx``, ``0xCxxx``, ``0x01xx``, unknown values) is permanent for that
    object: sending the same bytes again gets the same answer.
    """
    if is_success(status) or is_warning(status):
        return None
    if 0xA700 <= status <= 0xA7FF:
        return FailureClass.OUT_OF_RESOURCES
    return FailureClass.FAILURE_STATUS
