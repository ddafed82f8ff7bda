"""Studies to send, and senders that know which instances were acknowledged."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.filereader import read_file_meta_info
from pydicom.uid import MRImageStorage
from pynetdicom import AE, _config

from dicom_node.net.requestor import associate
from pipeline.synth import StudyHeader, load_reference_brain, write_mr_series
from tests.chaos.node_process import NODE_AE, SCANNER_AE

PHI_NAME_PREFIX = "Chaospatient"


@dataclass(frozen=True)
class Study:
    """A study on disk and the identifiers that must never reach a log."""

    index: int
    kind: str  # "quick" (localizer only: not analysed) or "t1" (analysed)
    study_instance_uid: str
    patient_name: str
    patient_id: str
    birth_date: str
    files: tuple[Path, ...]


@lru_cache(maxsize=1)
def _brain() -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    return load_reference_brain("colin27")


def make_study(root: Path, index: int, kind: str) -> Study:
    """Write study number *index* of the given kind under *root*."""
    header = StudyHeader(
        patient_name=f"{PHI_NAME_PREFIX}^Number{index:04d}",
        patient_id=f"CHAOS-PID-{index:05d}",
        patient_birth_date=f"19{30 + index % 60:02d}0{1 + index % 9}1{index % 9}",
        patient_sex="F" if index % 2 else "M",
        study_instance_uid=f"1.2.826.0.1.3680043.10.1389.77.{index}",
        study_date="20261115",
        study_time="120000",
        accession_number=f"CHAOS-ACC-{index:05d}",
    )
    volume, affine = _brain()
    out = root / f"study{index:05d}"
    files = write_mr_series(volume, affine, out / "loc", study=header, series_number=1, kind="localizer")
    if kind == "t1":
        files += write_mr_series(volume, affine, out / "t1", study=header, series_number=3, orientation="sagittal")
    return Study(index, kind, header.study_instance_uid, header.patient_name, header.patient_id,
                 header.patient_birth_date, tuple(files))


@dataclass
class Ledger:
    """What the node acknowledged with Success, and what it refused or dropped."""

    acked: set[str] = field(default_factory=set)
    refused: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    last_sent: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_files(port: int, files: Iterable[Path], ledger: Ledger, *, calling: str = SCANNER_AE
               ) -> dict[Path, int | None]:
    """Send files as they are on disk (unparsed) over one association; each file's status (None: no response)."""
    results: dict[Path, int | None] = {}
    paths = list(files)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    transfer_syntaxes = set()
    for path in paths:
        meta = read_file_meta_info(path)
        transfer_syntaxes.add(str(meta.TransferSyntaxUID))
    ae.add_requested_context(MRImageStorage, sorted(transfer_syntaxes))
    # Files are always sent as they are on disk, unparsed (a process-wide pynetdicom switch, so it is
    # never turned off again: senders run in parallel threads).
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = associate(ae, "127.0.0.1", port, ae_title=NODE_AE)
    if not assoc.is_established:
        return dict.fromkeys(paths)
    for path in paths:
        if not assoc.is_established:
            results[path] = None
            continue
        try:
            response = assoc.send_c_store(path)
        except (OSError, ValueError, AttributeError, RuntimeError):
            response = None
        status = int(response.Status) if response is not None and "Status" in response else None
        results[path] = status
    if assoc.is_established:
        assoc.release()
    return results


def sop_uid(path: Path) -> str:
    """The SOP Instance UID in a file's meta."""
    return str(read_file_meta_info(path).MediaStorageSOPInstanceUID)


def send_until_acked(port: int, study: Study, ledger: Ledger, stop: threading.Event,
                     alive: threading.Event | None = None) -> None:
    """Send a study like a scanner does: resend what was not acknowledged until all is."""
    import time

    pending = list(study.files)
    pause = threading.Event()
    while pending and not stop.is_set():
        if alive is not None and not alive.wait(timeout=1):
            continue
        results = send_files(port, pending, ledger)
        still = []
        for path, status in results.items():
            if status == 0:
                with ledger.lock:
                    ledger.acked.add(sop_uid(path))
            else:
                still.append(path)
                with ledger.lock:
                    if status is None:
                        ledger.dropped += 1
                    else:
                        ledger.refused[f"0x{status:04X}"] = ledger.refused.get(f"0x{status:04X}", 0) + 1
        pending = still
        if pending:
            pause.wait(0.5)
    with ledger.lock:
        ledger.last_sent[study.study_instance_uid] = time.monotonic()
