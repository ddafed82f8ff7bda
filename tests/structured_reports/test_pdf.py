"""Tests of structured_reports.pdf: the Encapsulated PDF (Modality DOC) fallback."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.image import imread
from pydicom.dataset import Dataset
from pydicom.uid import EncapsulatedPDFStorage

from core.errors import Outcome
from structured_reports.pdf import render_pdf
from structured_reports.types import DISCLAIMER, NotesUsed
from structured_reports.validate import require_valid
from tests.support.sr import RUN_TIME, make_mr_series, make_report
from tests.support.sr import build_pdf_object as build


@pytest.fixture(scope="module")
def mr_series() -> list[Dataset]:
    return make_mr_series()


def key_slices() -> list[np.ndarray]:
    ramp = np.outer(np.hanning(48), np.hanning(40))
    return [ramp * scale for scale in (1.0, 2.0, 3.0)]


def pdf_text(document: bytes, tmp_path: Path) -> str:
    path = tmp_path / "report.pdf"
    path.write_bytes(document)
    result = subprocess.run(
        ["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True, check=True, timeout=60
    )
    return " ".join(result.stdout.split())


def test_pdf_is_a_valid_doc_instance_in_the_study(mr_series: list[Dataset], tmp_path: Path) -> None:
    ds = build(mr_series, key_slices=key_slices())

    require_valid(ds, workdir=tmp_path)
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    reread = pydicom.dcmread(buffer)
    assert reread.SOPClassUID == EncapsulatedPDFStorage
    assert reread.Modality == "DOC"
    assert reread.MIMETypeOfEncapsulatedDocument == "application/pdf"
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        assert reread[keyword].value == mr_series[0][keyword].value, keyword
    assert {item.ReferencedSOPInstanceUID for item in reread.SourceInstanceSequence} == {
        ds.SOPInstanceUID for ds in mr_series
    }
    document = bytes(reread.EncapsulatedDocument)[: reread.EncapsulatedDocumentLength]
    assert document.startswith(b"%PDF")


def test_pdf_page_one_is_not_blank(mr_series: list[Dataset], tmp_path: Path) -> None:
    document = bytes(build(mr_series, key_slices=key_slices()).EncapsulatedDocument)
    (tmp_path / "report.pdf").write_bytes(document)
    subprocess.run(
        ["pdftoppm", "-r", "40", "-png", "-f", "1", "-l", "1", "-singlefile",
         str(tmp_path / "report.pdf"), str(tmp_path / "page")],
        check=True,
        timeout=60,
    )
    pixels = imread(tmp_path / "page.png")[..., :3]

    dark = (pixels.mean(axis=2) < 0.8).mean()
    assert pixels.shape[0] > pixels.shape[1] > 100
    assert 0.02 < dark < 0.6


def test_pdf_text_has_result_provenance_and_disclaimer(mr_series: list[Dataset], tmp_path: Path) -> None:
    text = pdf_text(render_pdf(mr_series, make_report(), content_datetime=RUN_TIME), tmp_path)

    assert "Most likely class: AD (Alzheimer's disease)" in text
    assert "AD 0.620, MCI 0.270, CN 0.110" in text
    assert "2 clinical notes" in text
    assert "preproc-0.5.1" in text
    assert "Demonstration model, not for clinical use." in text
    assert DISCLAIMER in text


def test_pdf_not_analysed(mr_series: list[Dataset], tmp_path: Path) -> None:
    report = make_report(not_analysed=(Outcome.QC_FAILED, "motion artefacts"), notes=NotesUsed())
    ds = build(mr_series, report=report)

    require_valid(ds, workdir=tmp_path)
    text = pdf_text(bytes(ds.EncapsulatedDocument), tmp_path)
    assert "Not analysed: motion artefacts" in text
    assert "Most likely class" not in text


def test_pdf_rendering_is_reproducible(mr_series: list[Dataset]) -> None:
    first = render_pdf(mr_series, make_report(), content_datetime=RUN_TIME)
    again = render_pdf(mr_series, make_report(), content_datetime=RUN_TIME)

    assert first == again
