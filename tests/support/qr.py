"""Helpers of the Query/Retrieve tests: an Orthanc holding one patient's study history, a Storage SCP, a log check.

Patient A (issuer HOSP_A) has six studies: one too old, two priors (the newer
one without a T1 series), the current one and a later one; the same PatientID
under issuer HOSP_B has one more study; patient B has only the current study.
Every series is a small synthetic MR series (:func:`pipeline.synth.write_mr_series`)
stored into Orthanc with DCMTK's ``storescu``.  :func:`no_patient_data_in_qr_logs`
(autouse where imported) checks that no name, ID or accession number of these
patients reaches a log record.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt

from dicom_node.cli.localpacs import LocalOrthanc, free_port
from dicom_node.statuses import StoreStatus
from pipeline.synth import StudyHeader, write_mr_series
from tests.conftest import require_tool
from tests.support.logs import logs_free_of

NODE_AE = "AD_NODE"
PID_A, PID_B = "QR-PID-A-0001", "QR-PID-B-0002"
ROOT = "1.2.826.0.1.3680043.10.1389.88"


def _study(name: str, pid: str, issuer: str, n: int, date: str) -> StudyHeader:
    return StudyHeader(patient_name=name, patient_id=pid, patient_birth_date="19470707", patient_sex="M",
                       study_instance_uid=f"{ROOT}.{n}", study_date=date, study_time="093000",
                       accession_number=f"QR-ACC-{n:03d}", issuer_of_patient_id=issuer)


A = "Qrtest^Anna"
STUDIES = {
    "ancient": _study(A, PID_A, "HOSP_A", 1, "20140101"),
    "prior_t2_only": _study(A, PID_A, "HOSP_A", 2, "20240201"),
    "prior": _study(A, PID_A, "HOSP_A", 3, "20230115"),
    "current": _study(A, PID_A, "HOSP_A", 4, "20250310"),
    "later": _study(A, PID_A, "HOSP_A", 5, "20260101"),
    "other_issuer": _study("Qrtest^Otto", PID_A, "HOSP_B", 6, "20220606"),
    "single": _study("Qrtest^Berta", PID_B, "HOSP_A", 7, "20250310"),
}
#: Which series each study has (series number, kind).
SERIES = {key: [(3, "t1_mprage")] for key in STUDIES} | {
    "prior_t2_only": [(4, "t2")], "prior": [(3, "t1_mprage"), (4, "t2")]}
PHI = sorted({s for h in STUDIES.values() for s in (h.patient_id, h.accession_number, h.patient_name,
                                                      h.patient_name.split("^")[1])})


@dataclass(frozen=True)
class StoredSeries:
    """One series stored into the PACS: its UIDs and the SOP Instance UIDs of its instances."""

    study_uid: str
    series_uid: str
    description: str
    sop_uids: frozenset[str]


@dataclass(frozen=True)
class QRPacs:
    """An Orthanc that knows the node's AE title (C-MOVE destination ``127.0.0.1:node_port``)."""

    orthanc: LocalOrthanc
    node_port: int
    series: dict[str, list[StoredSeries]]


def write_history(directory: Path) -> tuple[list[Path], dict[str, list[StoredSeries]]]:
    """Write every series of :data:`STUDIES`; return the files and what each study holds."""
    files: list[Path] = []
    stored: dict[str, list[StoredSeries]] = {}
    for key, header in STUDIES.items():
        for number, kind in SERIES[key]:
            volume = np.random.default_rng(number).uniform(10, 1000, (16, 16, 12)).astype(np.float32)
            written = write_mr_series(volume, np.diag([2.0, 2.0, 2.0, 1.0]), directory / key / str(number),
                                      study=header, series_number=number, kind=kind)
            first = pydicom.dcmread(written[0], stop_before_pixels=True)
            uids = frozenset(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in written)
            stored.setdefault(key, []).append(StoredSeries(header.study_instance_uid, str(first.SeriesInstanceUID),
                                                           str(first.SeriesDescription), uids))
            files += written
    return files, stored


def store(orthanc: LocalOrthanc, files: list[Path]) -> None:
    """C-STORE *files* into Orthanc with DCMTK's storescu."""
    result = subprocess.run([require_tool("storescu"), "-aet", "SCANNER", "-aec", orthanc.ae_title, "127.0.0.1",
                             str(orthanc.dicom_port), *map(str, files)], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def qr_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QRPacs]:
    """An Orthanc holding :data:`STUDIES`, with the node's AE title in its DicomModalities."""
    node_port = free_port()
    pacs = LocalOrthanc(tmp_path_factory.mktemp("qr-orthanc"), modalities={"node": (NODE_AE, "127.0.0.1", node_port)})
    files, stored = write_history(tmp_path_factory.mktemp("qr-studies"))
    pacs.start()
    try:
        store(pacs, files)
        assert len(pacs.get("/instances")) == len(files)
        yield QRPacs(pacs, node_port, stored)
    finally:
        pacs.stop()


@contextmanager
def storage_scp(port: int, ae_title: str = NODE_AE) -> Iterator[list[pydicom.Dataset]]:
    """A pynetdicom Storage SCP on 127.0.0.1:*port*; yields the list of data sets it received."""
    received: list[pydicom.Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return int(StoreStatus.SUCCESS)

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        yield received
    finally:
        server.shutdown()


@pytest.fixture(autouse=True)
def no_patient_data_in_qr_logs() -> Iterator[None]:
    """Every log record of the node (DEBUG) and pynetdicom (INFO) during a test is free of :data:`PHI`."""
    with logs_free_of(PHI, debug=("dicom_node", "pipeline")):
        yield
