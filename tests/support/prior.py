"""Patients with prior studies in an Orthanc that is both the node's Query/Retrieve SCP and its report destination.

Brains are Colin27 (Debian ``mricron-data``) written as sagittal 1.5 mm MPRAGE series
(121 slices: about the fewest the node analyses, and cheap to process).  A prior is
Colin27 itself; a current study is Colin27 with both hippocampi shrunk by about 20 %
and the lateral ventricles grown by about 44 % (:mod:`tests.support.deformation`: the
changes are computed from the field, independently of the node), so a comparison has a
known direction.

Patients (issuer ``HOSP_P``; the current studies are of 2025-03-10):

* ``R``: prior ``R1`` (2023-01-15, in Orthanc), current ``R2``: the node analyses R1 first
  (it has no prior of its own), then R2's run reuses R1's run.
* ``G``: prior ``G1`` (2023-06-01) only in Orthanc: R2's run retrieves and analyses it.
* ``N``: prior ``N1`` (2024-01-01) in Orthanc as Secondary Capture objects of an MR series: the
  C-FIND finds it, the C-GET cannot bring it (the node takes MR objects only): not retrievable.
* ``Z``: no prior at all.

Orthanc knows three AE titles: :data:`NODE_AE` (query and retrieve; C-MOVE destination on
``node_port``), :data:`NO_RETRIEVE_AE` (may query, may neither C-GET nor C-MOVE) and nothing else
(another caller is refused).  :func:`no_patient_data_in_prior_logs` (autouse where imported)
checks that no name, ID or accession number of these patients reaches a log record.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from dicom_node.app import Node
from dicom_node.cli.localpacs import LocalOrthanc, free_port, wait_for
from dicom_node.db.models import Run, Study
from pipeline.synth import StudyHeader, write_mr_series
from tests.support.deformation import displacement, load_colin, pull_back, volume_change
from tests.support.logs import logs_free_of
from tests.support.qr import store

NODE_AE = "AD_NODE"
NO_RETRIEVE_AE = "NO_RETRIEVE"
ISSUER = "HOSP_P"
ROOT = "1.2.826.0.1.3680043.10.1389.66"
#: Pull-back amplitudes of the current studies' deformation (about -20 % hippocampi, +44 % ventricles).
HIPPOCAMPUS_AMPLITUDE, VENTRICLE_AMPLITUDE = -9.0, 19.0


def _header(letter: str, n: int, date: str) -> StudyHeader:
    return StudyHeader(patient_name=f"Priortest^{letter}name", patient_id=f"PR-PID-{letter}-000{n}",
                       patient_birth_date="19470707", patient_sex="F", study_instance_uid=f"{ROOT}.{n}.{date}",
                       study_date=date, study_time="093000", accession_number=f"PRA-{letter}-{date}",
                       issuer_of_patient_id=ISSUER)


CURRENT_DATE = "20250310"
STUDIES = {
    "R1": _header("R", 1, "20230115"), "R2": _header("R", 1, CURRENT_DATE),
    "G1": _header("G", 2, "20230601"), "G2": _header("G", 2, CURRENT_DATE),
    "N1": _header("N", 3, "20240101"), "N2": _header("N", 3, CURRENT_DATE),
    "Z2": _header("Z", 4, CURRENT_DATE),
}
#: The studies Orthanc holds before any test (the current studies are sent to the node).
IN_PACS = ("R1", "G1", "N1")
PHI = sorted({s for h in STUDIES.values() for s in (h.patient_id, h.accession_number, h.patient_name,
                                                      h.patient_name.split("^")[1])})


@dataclass(frozen=True)
class Written:
    """One study's T1 series on disk."""

    header: StudyHeader
    directory: Path
    series_uid: str
    sop_uids: tuple[str, ...]

    @property
    def study_uid(self) -> str:
        return self.header.study_instance_uid


@dataclass(frozen=True)
class PriorPacs:
    """The Orthanc of the priors; ``node_port`` is where it sends C-MOVEs for :data:`NODE_AE`."""

    orthanc: LocalOrthanc
    node_port: int
    studies: dict[str, Written]


def _write(volume: np.ndarray, affine: np.ndarray, directory: Path, header: StudyHeader,
           voxel_mm: float | None = 1.5) -> Written:
    files = write_mr_series(volume, affine, directory, study=header, series_number=3, orientation="sagittal",
                            voxel_mm=voxel_mm)
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    return Written(header, directory, str(datasets[0].SeriesInstanceUID),
                   tuple(str(ds.SOPInstanceUID) for ds in datasets))


def _as_secondary_capture(written: Written) -> None:
    """Re-label every file of *written* as Secondary Capture (still Modality MR, so the C-FIND finds it)."""
    for path in written.directory.iterdir():
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.save_as(path, enforce_file_format=True)


@functools.lru_cache(maxsize=1)
def brains() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """Colin27, Colin27 deformed as the current studies are, its affine, the expected relative changes."""
    colin = load_colin()
    field = displacement(colin.volume.shape, [(colin.hippocampus_left, HIPPOCAMPUS_AMPLITUDE),
                                              (colin.hippocampus_right, HIPPOCAMPUS_AMPLITUDE),
                                              (colin.ventricles, VENTRICLE_AMPLITUDE)])
    expected = {"hippocampus_left": volume_change(colin.hippocampus_left, field),
                "lateral_ventricles": volume_change(colin.ventricles, field)}
    return colin.volume, pull_back(colin.volume, field), colin.affine, expected


def write_study(root: Path, key: str, *, brain: bool = True) -> Written:
    """The T1 series of study *key*: Colin27 for a prior, deformed Colin27 for a current study.

    ``brain=False`` (and always for N1, never analysed): 12 slices of noise with the same headers, for tests
    that stand in for the analysis.  N1 is written as Secondary Capture.
    """
    header = STUDIES[key]
    if key == "N1" or not brain:
        small = np.random.default_rng(3).uniform(10, 1000, (16, 16, 12)).astype(np.float32)
        written = _write(small, np.diag([2.0, 2.0, 2.0, 1.0]), root / key, header, voxel_mm=None)
        if key == "N1":
            _as_secondary_capture(written)
        return written
    base, deformed, affine, _ = brains()
    return _write(deformed if key.endswith("2") else base, affine, root / key, header)


def orthanc_modalities(node_port: int) -> dict[str, dict[str, object]]:
    """Orthanc's ``DicomModalities``: the node (everything) and an AE that may query but not retrieve."""
    return {
        "node": {"AET": NODE_AE, "Host": "127.0.0.1", "Port": node_port},
        "no_retrieve": {"AET": NO_RETRIEVE_AE, "Host": "127.0.0.1", "Port": free_port(),
                        "AllowGet": False, "AllowMove": False},
    }


def start_prior_pacs(factory: pytest.TempPathFactory, *, brains: bool) -> Iterator[PriorPacs]:
    """An Orthanc holding the studies of :data:`IN_PACS` (written here: Colin27 with *brains*, else small series),
    knowing :data:`NODE_AE` and :data:`NO_RETRIEVE_AE`."""
    node_port = free_port()
    pacs = LocalOrthanc(factory.mktemp("prior-orthanc"))
    pacs.modalities = orthanc_modalities(node_port)  # Orthanc's object form
    root = factory.mktemp("prior-studies")
    studies = {key: write_study(root, key, brain=brains) for key in IN_PACS}
    pacs.start()
    try:
        for key in IN_PACS:
            store(pacs, sorted(studies[key].directory.iterdir()))
        yield PriorPacs(pacs, node_port, studies)
    finally:
        pacs.stop()


@pytest.fixture(scope="module")
def prior_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PriorPacs]:
    """:func:`start_prior_pacs` with small series (for tests that stand in for the analysis)."""
    yield from start_prior_pacs(tmp_path_factory, brains=False)


@pytest.fixture(scope="module")
def brain_pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PriorPacs]:
    """:func:`start_prior_pacs` with Colin27 priors (for full runs)."""
    yield from start_prior_pacs(tmp_path_factory, brains=True)


def prior_settings(pacs: PriorPacs, **overrides: object) -> dict[str, object]:
    """Setting overrides: the comparison with priors on, against *pacs*, short timeouts."""
    values: dict[str, object] = {
        "prior.enabled": True, "prior.pacs.ae_title": pacs.orthanc.ae_title, "prior.pacs.host": "127.0.0.1",
        "prior.pacs.port": pacs.orthanc.dicom_port, "prior.acse_timeout_s": 5, "prior.dimse_timeout_s": 30,
        "prior.network_timeout_s": 30, "prior.retrieve_timeout_s": 120, "network.ae_title": NODE_AE,
    }
    values.update(overrides)
    return values


def study_run(node: Node, study_uid: str, timeout_s: float = 300) -> Run:
    """The finished run of *study_uid* (waits for it)."""
    def done() -> Run | None:
        with node.db.sessions() as session:
            return session.scalars(select(Run).join(Study).where(Study.study_instance_uid == study_uid,
                                                                 Run.finished_at.is_not(None))).first()
    return wait_for(done, timeout_s, "the study's run to be recorded as finished")


def study_sr(pacs: LocalOrthanc, study_uid: str, path: Path, timeout_s: float = 60) -> Path:
    """The one SR of *study_uid* in Orthanc, saved as *path*."""
    found = wait_for(lambda: pacs.find_instances(Modality="SR", StudyInstanceUID=study_uid), timeout_s,
                     "the study's SR in Orthanc", 0.5)
    assert len(found) == 1, len(found)
    path.write_bytes(pacs.get_bytes(f"/instances/{found[0]['ID']}/file"))
    return path


# ----- reading the SR by its codes (spelled out as published, independently of structured_reports) ----------------
#: Finding site and laterality (SNOMED CT) of the structures the tests look at.
SITES = {"hippocampus_left": (("5366008", "SCT"), ("7771000", "SCT")),
         "lateral_ventricles": (("66720007", "SCT"), ("51440002", "SCT"))}
FINDING_SITE, LATERALITY = ("363698007", "SCT"), ("272741003", "SCT")
#: The node's codes (scheme 99ADNODE) of the comparison.
RELATIVE_CHANGE_PER_YEAR, PRIOR_VOLUME, PROBABILITY_CHANGE = (
    ("VOLPCTRATE", "99ADNODE"), ("PRIORVOL", "99ADNODE"), ("PROBCHG", "99ADNODE"))
FINDING = ("121071", "DCM")
CLASS_OF_CODE = {("26929004", "SCT"): "AD", ("386805003", "SCT"): "MCI", ("CN", "99ADNODE"): "CN"}


def _code(item: Dataset, keyword: str) -> tuple[str, str] | None:
    codes = item.get(keyword)
    return (str(codes[0].CodeValue), str(codes[0].CodingSchemeDesignator)) if codes else None


def _walk(items: object) -> Iterator[Dataset]:
    for item in items or []:  # type: ignore[attr-defined]
        yield item
        yield from _walk(item.get("ContentSequence"))


def group_numbers(sr: Dataset, structure: str) -> dict[tuple[str, str], float]:
    """The NUM values (by concept code) of the one measurement group of *structure* (by finding site and laterality)."""
    site, laterality = SITES[structure]
    found = []
    for group in _walk(sr.get("ContentSequence")):
        if group.get("ValueType") != "CONTAINER":
            continue
        children = list(group.get("ContentSequence") or [])
        coded = {(_code(c, "ConceptNameCodeSequence"), _code(c, "ConceptCodeSequence")) for c in children
                 if c.get("ValueType") == "CODE"}
        lateral = {_code(m, "ConceptCodeSequence") for c in children for m in (c.get("ContentSequence") or [])
                   if _code(m, "ConceptNameCodeSequence") == LATERALITY}
        if (FINDING_SITE, site) in coded and laterality in lateral:
            found.append({_code(c, "ConceptNameCodeSequence"): float(c.MeasuredValueSequence[0].NumericValue)
                          for c in children if c.get("ValueType") == "NUM" and c.get("MeasuredValueSequence")})
    assert len(found) == 1, f"{len(found)} measurement groups of {structure}"
    return {name: value for name, value in found[0].items() if name is not None}


def probability_changes(sr: Dataset) -> dict[str, float]:
    """Change in probability since the prior, by class (from each PROBCHG NUM's Finding modifier)."""
    changes = {}
    for item in _walk(sr.get("ContentSequence")):
        if item.get("ValueType") == "NUM" and _code(item, "ConceptNameCodeSequence") == PROBABILITY_CHANGE:
            classes = [CLASS_OF_CODE.get(_code(m, "ConceptCodeSequence") or ("", ""), "?")
                       for m in item.get("ContentSequence") or [] if _code(m, "ConceptNameCodeSequence") == FINDING]
            changes[classes[0] if classes else "?"] = float(item.MeasuredValueSequence[0].NumericValue)
    return changes


def evidence_sop_uids(sr: Dataset, study_uid: str) -> set[str]:
    """SOP Instance UIDs the SR cites as evidence of *study_uid* (current or pertinent other evidence)."""
    uids = set()
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword) or []:
            if str(study.StudyInstanceUID) == study_uid:
                uids |= {str(i.ReferencedSOPInstanceUID) for s in study.ReferencedSeriesSequence
                         for i in s.ReferencedSOPSequence}
    return uids


@pytest.fixture(autouse=True)
def no_patient_data_in_prior_logs() -> Iterator[None]:
    """Every log record of the node and the pipeline (DEBUG) and pynetdicom (INFO) is free of :data:`PHI`."""
    with logs_free_of(PHI, debug=("dicom_node", "pipeline")):
        yield
