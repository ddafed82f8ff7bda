"""Named DIMSE statuses the node answers with (PS3.4 Annex B, PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    """C-STORE response statuses used by the node's Storage SCP."""

    SUCCESS = 0x0000
    REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000


class VerificationStatus(IntEnum):
    """C-ECHO response statuses."""

    SUCCESS = 0x0000


def is_success(status: int | None) -> bool:
    """True for Success."""
    return status == StoreStatus.SUCCESS


def is_warning(status: int | None) -> bool:
    """True for the Warning statuses of the Storage Service Class (0x0001, 0xBxxx)."""
    return status is not None and (status == 0x0001 or 0xB000 <= status <= 0xBFFF)
