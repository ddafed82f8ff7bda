"""The PDF page as a new reader meets it: warning banner, patient header, QC, "not analysed", key slices.

Text is read back with ``pdftotext`` (positions with ``-bbox``), sizes from the page rendered by ``pdftoppm``.
"""

from __future__ import annotations

import re
import subprocess
from html import unescape
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from matplotlib.image import imread
from matplotlib.patches import FancyBboxPatch
from pydicom.dataset import Dataset

from core.errors import Outcome
from pipeline.preprocess_config import PreprocessConfig
from pipeline.qc import qc_checks
from structured_reports.pdf import compose_page, render_pdf
from structured_reports.types import KeySlice, NotesUsed
from tests.conftest import require_tool
from tests.support.sr import QC_VALUES, RUN_TIME, make_mr_series, make_report, received_study

RESEARCH_ONLY = "For research use only. Not a medical device; not for clinical diagnosis."


def pdf_text(document: bytes, tmp_path: Path) -> str:
    path = tmp_path / "page.pdf"
    path.write_bytes(document)
    out = subprocess.run([require_tool("pdftotext"), "-layout", str(path), "-"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return " ".join(out.split())


def words(document: bytes, tmp_path: Path) -> list[tuple[str, float, float]]:
    """(word, yMin, yMax) of every word on the page, top to bottom as pdftotext -bbox gives them."""
    path = tmp_path / "bbox.pdf"
    path.write_bytes(document)
    html = subprocess.run([require_tool("pdftotext"), "-bbox", str(path), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    pattern = r'<word xMin="[\d.]+" yMin="([\d.]+)" xMax="[\d.]+" yMax="([\d.]+)">([^<]*)</word>'
    return [(unescape(word), float(y0), float(y1)) for y0, y1, word in re.findall(pattern, html)]


def first(found: list[tuple[str, float, float]], word: str) -> tuple[float, float]:
    for text, y0, y1 in found:
        if text == word:
            return y0, y1
    raise AssertionError(f"{word!r} not on the page")


def test_the_warning_is_a_framed_banner_as_large_and_bold_as_the_result(tmp_path: Path) -> None:
    sources = make_mr_series()
    fig = compose_page(sources, make_report(), content_datetime=RUN_TIME)

    texts = {artist.get_text(): artist for artist in fig.texts}
    banner = next(a for t, a in texts.items() if t.startswith("Demonstration model, not for clinical use.\n"))
    result = next(a for t, a in texts.items() if t.startswith("Most likely class: AD"))
    assert banner.get_fontsize() == cast(float, result.get_fontsize()) >= 12
    assert banner.get_fontweight() == result.get_fontweight() == "bold"
    assert RESEARCH_ONLY.split(";")[0] in banner.get_text()
    frames = [p for p in fig.artists if isinstance(p, FancyBboxPatch)]
    assert len(frames) == 1
    frame = frames[0].get_bbox()  # figure fractions
    x, y = banner.get_position()
    assert frame.x0 < x < frame.x1 and frame.y0 < y <= frame.y1 and frame.y1 > 0.9  # framed, at the top

    found = words(render_pdf(sources, make_report(), content_datetime=RUN_TIME), tmp_path)
    warning, title, patient, most = (first(found, w) for w in ("Demonstration", "Brain", "Patient:", "Most"))
    assert warning[0] < title[0] < patient[0] < most[0]  # banner above the title, the header and the result
    assert abs((warning[1] - warning[0]) - (most[1] - most[0])) < 0.5  # same type size on the page


def test_the_header_names_sex_and_age_at_the_study(tmp_path: Path) -> None:
    sources = make_mr_series()  # PatientAge 076Y
    text = pdf_text(render_pdf(sources, make_report(), content_datetime=RUN_TIME), tmp_path)
    assert "Patient: Test, Patient ID: SR-TEST-0001" in text
    assert "Birth date: 1948-02-15 Sex: female Age at study: 76 years" in text

    for ds in sources:  # no PatientAge: from birth date 1948-03-15 and study date 2024-03-04, the day before
        del ds.PatientAge
        ds.PatientBirthDate, ds.PatientSex = "19480315", "M"
    text = pdf_text(render_pdf(sources, make_report(), content_datetime=RUN_TIME), tmp_path)
    assert "Sex: male Age at study: 75 years" in text


def test_the_qc_values_are_printed_with_their_limits(tmp_path: Path) -> None:
    text = pdf_text(render_pdf(make_mr_series(), make_report(), content_datetime=RUN_TIME), tmp_path)
    assert "Image quality checks (all within their limits)" in text
    for line in ("Slices 176 (at least 100)", "Slice thickness 1.00 mm (at most 1.5 mm)",
                 "Template correlation 0.912 (at least 0.5)", "Brain coverage 0.998 (at least 0.95)",
                 "WM/GM ratio 1.310 (at least 1.05)"):
        assert line in text, line

    strict = qc_checks(QC_VALUES, PreprocessConfig(min_correlation=0.95))
    text = pdf_text(render_pdf(make_mr_series(), make_report(qc=strict), content_datetime=RUN_TIME), tmp_path)
    assert "Image quality checks (NOT ALL WITHIN THEIR LIMITS)" in text
    assert "Template correlation 0.912 (at least 0.95, OUTSIDE THE LIMIT)" in text


def test_the_not_analysed_page_says_what_came_why_and_what_is_needed_without_contradiction(tmp_path: Path) -> None:
    reason = "no suitable 3D T1 series (2 series considered)"
    report = make_report(not_analysed=(Outcome.NO_SUITABLE_SERIES, reason), notes=NotesUsed())
    text = pdf_text(render_pdf(received_study(), report, content_datetime=RUN_TIME), tmp_path)

    assert "Not analysed: " + reason in text
    received = text.index("What was received")
    localizer = text.index('Series 1 "localizer" (MR, 3 images)')
    t2 = text.index('Series 2 "t2_tse_tra" (MR, 2 images)')
    needed = text.index("What the node needs")
    assert received < localizer < t2 < needed
    assert "with at least 120 slices and a slice thickness of at most 1.2 mm" in text
    assert "No model was run; no clinical note was used. Node BRAINAI-NODE-1 software 0.3.0; run run-0042." in text
    assert text.startswith(RESEARCH_ONLY)  # the banner, without "demonstration model": no model ran
    for contradiction in ("Series analysed", "Brain-Adapter", "version 1.2.0", "weights", "preproc-0.5.1",
                          "Most likely", "Image quality checks", "Demonstration model"):
        assert contradiction not in text, contradiction


def test_a_processing_error_page_does_not_ask_for_another_series(tmp_path: Path) -> None:
    report = make_report(not_analysed=(Outcome.PROCESSING_ERROR, "the analysis model could not be run."),
                         notes=NotesUsed())
    text = pdf_text(render_pdf(make_mr_series(), report, content_datetime=RUN_TIME), tmp_path)

    assert "Not analysed: the analysis model could not be run." in text
    assert "What was received" in text and "What the node needs" not in text


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    padded = np.concatenate([[False], flags, [False]]).astype(int)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("shapes", [[(60, 40), (30, 60), (60, 20)], [(233, 197), (189, 197), (189, 233)]])
def test_key_slices_are_drawn_as_equal_squares_at_one_scale(shapes: list[tuple[int, int]], tmp_path: Path) -> None:
    slices = []
    for n_rows, n_columns in shapes:
        image = np.full((n_rows, n_columns), 0.5, dtype=np.float32)  # grey, its extremes in two corners
        image[0, 0], image[-1, -1] = 1.0, 0.0
        slices.append(KeySlice(image=image, title="slice"))
    document = render_pdf(make_mr_series(), make_report(), key_slices=slices, content_datetime=RUN_TIME)
    (tmp_path / "page.pdf").write_bytes(document)
    subprocess.run([require_tool("pdftoppm"), "-r", "72", "-png", "-singlefile", str(tmp_path / "page.pdf"),
                    str(tmp_path / "page")], check=True, timeout=60)
    grey = imread(tmp_path / "page.png")[..., :3].mean(axis=2)

    ink = grey < 0.8  # the squares: black padding and grey image (the page is white)
    rows = max(_runs(ink.mean(axis=1) > 0.6), key=lambda run: run[1])
    band = ink[rows[0]:rows[0] + rows[1]]
    squares = _runs(band.mean(axis=0) > 0.95)
    assert len(squares) == 3, squares
    side = rows[1]
    assert all(abs(width - side) <= 1 for _, width in squares), (squares, side)
    sizes = []  # (page pixels, image pixels), down and across each slice
    for (start, width), (h, w) in zip(squares, shapes, strict=True):
        inside = grey[rows[0] + 2:rows[0] + side - 2, start + 2:start + width - 2]  # not the anti-aliased edge
        image = (inside > 0.3) & (inside < 0.7)
        grey_rows, grey_columns = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        assert grey_rows.size < side - 4 and grey_columns.size < width - 4  # a black margin all round
        sizes += [(grey_rows.size, h), (grey_columns.size, w)]
    scale = sum(page for page, _ in sizes) / sum(pixels for _, pixels in sizes)
    assert all(abs(page - scale * pixels) <= 2.5 for page, pixels in sizes), (scale, sizes)  # one scale for all


def test_source_header_without_sex_or_dates_says_not_given(tmp_path: Path) -> None:
    sources: list[Dataset] = make_mr_series(2)
    for ds in sources:
        del ds.PatientAge, ds.PatientSex, ds.PatientBirthDate
    text = pdf_text(render_pdf(sources, make_report(), content_datetime=RUN_TIME), tmp_path)
    assert "Sex: not given Age at study: not given" in text
