"""Brain volumes and the prior-study comparison in the SR (TID 1501 groups) and on the PDF's second page.

Volumes, the prior and the normative table are built directly (:mod:`tests.support.volumes`); the SR is
encoded to bytes and read back with pydicom, checked with dciodvfy and dsrdump, and its items are found by
their codes, spelled out here as published (independently of ``structured_reports.concepts``).  Expected
values are computed here from the inputs and the chosen dates.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from core.errors import Outcome
from structured_reports.pdf import render_pdf
from structured_reports.validate import require_valid
from tests.support.sr import PROBABILITIES as PROBABILITIES_NOW
from tests.support.sr import RUN_TIME, build, content_items, make_mr_series, reread
from tests.support.volumes import (
    CURRENT,
    CURRENT_DATE,
    PRIOR,
    PRIOR_DATE,
    PRIOR_PROBABILITIES,
    make_prior,
    normative_table,
    report_with,
)

MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_IDENTIFIER = ("112039", "DCM")
FINDING_SITE = ("363698007", "SCT")
LATERALITY = ("272741003", "SCT")
HIPPOCAMPUS, LEFT, RIGHT = ("5366008", "SCT"), ("7771000", "SCT"), ("24028007", "SCT")
VOLUME = ("118565006", "SCT")
ML, PERCENT, NO_UNITS = ("ml", "UCUM"), ("%", "UCUM"), ("1", "UCUM")
ML_PER_YEAR, PERCENT_PER_YEAR = ("ml/a", "UCUM"), ("%/a", "UCUM")
PERCENT_OF_ICV = ("ICVPCT", "99ADNODE")
PRIOR_VOLUME = ("PRIORVOL", "99ADNODE")
VOLUME_CHANGE_PER_YEAR = ("VOLRATE", "99ADNODE")
RELATIVE_CHANGE_PER_YEAR = ("VOLPCTRATE", "99ADNODE")
ASYMMETRY = ("HIPPOASYM", "99ADNODE")
PROBABILITY_CHANGE = ("PROBCHG", "99ADNODE")
FINDING = ("121071", "DCM")
CLASS_CODES = {"AD": ("26929004", "SCT"), "MCI": ("386805003", "SCT"), "CN": ("CN", "99ADNODE")}
Z_SCORE, PERCENTILE = ("121416", "DCM"), ("121415", "DCM")
MEAN_OF_POPULATION, SD_OF_POPULATION = ("373098007", "SCT"), ("121414", "DCM")
SOURCE_OF_MEASUREMENT = ("121112", "DCM")
ALGORITHM_NAME, ALGORITHM_VERSION = ("111001", "DCM"), ("111003", "DCM")

#: The interval of the chosen dates, in years of 365.25 days (2022-03-04 to 2024-03-04: 731 days).
YEARS = (CURRENT_DATE - PRIOR_DATE).days / 365.25


def code(item: Dataset, keyword: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    entry = item[keyword][0]
    return str(entry.CodeValue), str(entry.CodingSchemeDesignator)


def children(item: Dataset, name: tuple[str, str]) -> list[Dataset]:
    return [child for child in item.get("ContentSequence", []) if code(child) == name]


def one(item: Dataset, name: tuple[str, str]) -> Dataset:
    found = children(item, name)
    assert len(found) == 1, f"expected one {name}, found {len(found)}"
    return found[0]


def value(num: Dataset) -> float:
    return float(num.MeasuredValueSequence[0].NumericValue)


def unit(num: Dataset) -> tuple[str, str]:
    return code(num.MeasuredValueSequence[0], "MeasurementUnitsCodeSequence")


def groups(sr: Dataset) -> dict[str, Dataset]:
    """Measurement groups of a re-read SR by their Tracking Identifier."""
    found = {}
    for item in content_items(sr.ContentSequence):
        if item.ValueType == "CONTAINER" and code(item) == MEASUREMENT_GROUP:
            found[str(one(item, TRACKING_IDENTIFIER).TextValue)] = item
    return found


def texts(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in content_items(sr.ContentSequence) if item.ValueType == "TEXT"]


def referenced(num: Dataset) -> list[str]:
    return [str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            for image in children(num, SOURCE_OF_MEASUREMENT)]


def dsrdump(sr: Dataset, tmp_path: Path) -> str:
    path = tmp_path / "sr.dcm"
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    result = subprocess.run(["/usr/bin/dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode, result.stderr) == (0, "")
    return result.stdout


def pdf_text(document: bytes, tmp_path: Path, page: int) -> str:
    path = tmp_path / "report.pdf"
    path.write_bytes(document)
    result = subprocess.run(["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(path), "-"],
                            capture_output=True, text=True, check=True, timeout=60)
    return result.stdout


def pages(document: bytes, tmp_path: Path) -> int:
    path = tmp_path / "pages.pdf"
    path.write_bytes(document)
    info = subprocess.run(["pdfinfo", str(path)], capture_output=True, text=True, check=True, timeout=60).stdout
    return int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))


@pytest.fixture(scope="module")
def mr_series() -> list[Dataset]:
    return make_mr_series()


def test_sr_with_volumes_only(mr_series: list[Dataset], tmp_path: Path) -> None:
    sr = build(mr_series, report_with(volumes=CURRENT))
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    found = groups(back)
    assert list(found)[1:] == ["Volumetry: left hippocampus", "Volumetry: right hippocampus",
                               "Volumetry: lateral ventricles", "Volumetry: grey matter", "Volumetry: white matter",
                               "Volumetry: intracranial volume", "Volumetry: hippocampal asymmetry"]
    left = found["Volumetry: left hippocampus"]
    site = one(left, FINDING_SITE)
    assert code(site, "ConceptCodeSequence") == HIPPOCAMPUS
    assert code(one(site, LATERALITY), "ConceptCodeSequence") == LEFT
    assert code(one(one(found["Volumetry: right hippocampus"], FINDING_SITE), LATERALITY),
                "ConceptCodeSequence") == RIGHT
    volume = one(left, VOLUME)
    assert (value(volume), unit(volume)) == (3.412, ML)
    share = one(left, PERCENT_OF_ICV)
    assert value(share) == pytest.approx(100 * 3.412 / 1450.0, abs=1e-4)
    assert unit(share) == PERCENT
    assert not children(volume, Z_SCORE) and not children(left, VOLUME_CHANGE_PER_YEAR)
    assert str(one(left, ALGORITHM_NAME).TextValue) == "pipeline.volumetry"
    assert str(one(left, ALGORITHM_VERSION).TextValue) == "1"
    assert not children(found["Volumetry: intracranial volume"], PERCENT_OF_ICV)
    asymmetry = one(found["Volumetry: hippocampal asymmetry"], ASYMMETRY)
    assert value(asymmetry) == pytest.approx(100 * (3.412 - 3.287) / ((3.412 + 3.287) / 2), abs=1e-4)
    assert unit(asymmetry) == PERCENT
    assert any("no normative data configured" in text for text in texts(back))
    assert "PertinentOtherEvidenceSequence" not in back
    assert any(item.get("ManufacturerModelName") == "pipeline.volumetry" for item in back.ContributingEquipmentSequence)


def test_sr_with_volumes_and_prior_gives_change_values(mr_series: list[Dataset], tmp_path: Path) -> None:
    prior = make_prior()
    sr = build(mr_series, report_with(volumes=CURRENT, prior=prior))
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    left = groups(back)["Volumetry: left hippocampus"]
    assert value(one(left, PRIOR_VOLUME)) == 3.5
    rate = one(left, VOLUME_CHANGE_PER_YEAR)
    assert value(rate) == pytest.approx((3.412 - 3.5) / YEARS, abs=1e-4)
    assert unit(rate) == ML_PER_YEAR
    relative = one(left, RELATIVE_CHANGE_PER_YEAR)
    assert value(relative) == pytest.approx(100 * (3.412 - 3.5) / 3.5 / YEARS, abs=1e-4)
    assert unit(relative) == PERCENT_PER_YEAR
    ventricles = groups(back)["Volumetry: lateral ventricles"]
    assert value(one(ventricles, VOLUME_CHANGE_PER_YEAR)) == pytest.approx((24.5 - 22.1) / YEARS, abs=1e-4)

    middle = prior.instances[len(prior.instances) // 2][1]
    assert middle in referenced(rate) and middle in referenced(one(left, PRIOR_VOLUME))
    other = back.PertinentOtherEvidenceSequence
    assert [item.StudyInstanceUID for item in other] == [prior.study_instance_uid]
    assert {ref.ReferencedSOPInstanceUID for ref in other[0].ReferencedSeriesSequence[0].ReferencedSOPSequence} == {
        uid for _, uid in prior.instances}
    current = back.CurrentRequestedProcedureEvidenceSequence
    assert [item.StudyInstanceUID for item in current] == [mr_series[0].StudyInstanceUID]

    classification = groups(back)["Brain-Adapter AD/MCI/CN classification, series 3"]
    changes = {}
    for item in children(classification, PROBABILITY_CHANGE):
        assert unit(item) == NO_UNITS
        label = next(c for c, codes in CLASS_CODES.items() if code(one(item, FINDING), "ConceptCodeSequence") == codes)
        changes[label] = value(item)
    assert changes == pytest.approx({c: PROBABILITIES_NOW[c] - PRIOR_PROBABILITIES[c] for c in CLASS_CODES},
                                    abs=1e-4)
    prior_texts = [text for text in texts(back) if text.startswith("Prior study of 2022-03-04")]
    assert len(prior_texts) == 1 and f"{YEARS:.2f} years earlier" in prior_texts[0]

    dump = dsrdump(sr, tmp_path)
    assert f'<contains NUM:(,,"Volume change per year")="{value(rate):g}" (ml/a,UCUM,"milliliter per year")>' in dump
    assert '<contains NUM:(,,"Volume")="3.412" (ml,UCUM,"milliliter")>' in dump
    assert '<contains NUM:(,,"Change in probability since the prior study")="0.12" (1,UCUM,"no units")>' in dump


def test_sr_with_prior_note_only(mr_series: list[Dataset], tmp_path: Path) -> None:
    sr = build(mr_series, report_with(prior_note="no prior study in the PACS"))
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    assert len(groups(back)) == 1  # the classification only
    assert "Comparison with a prior study: no prior study in the PACS" in texts(back)
    assert not any(t.startswith("Brain volumes") or "normative" in t for t in texts(back))
    assert "Comparison with a prior study: no prior study in the PACS" in dsrdump(sr, tmp_path)


def test_sr_z_score_and_percentile_against_the_configured_table(mr_series: list[Dataset], tmp_path: Path) -> None:
    sr = build(mr_series, report_with(volumes=CURRENT, normative=normative_table(tmp_path)))
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    volume = one(groups(back)["Volumetry: left hippocampus"], VOLUME)
    z = (3.412 - 3.8) / 0.4  # the patient is a woman of 76: the F 70-80 row, not the "any" one
    assert value(one(volume, Z_SCORE)) == pytest.approx(z, abs=1e-4)
    assert value(one(volume, PERCENTILE)) == pytest.approx(16.602, abs=1e-3)  # Phi(-0.97) = 0.16602
    assert unit(one(volume, PERCENTILE)) == PERCENT
    assert (value(one(volume, MEAN_OF_POPULATION)), value(one(volume, SD_OF_POPULATION))) == (3.8, 0.4)
    assert not children(one(groups(back)["Volumetry: grey matter"], VOLUME), Z_SCORE)  # no row for it
    assert any("source: Test cohort (synthetic)" in t and "grey matter" in t for t in texts(back))


def test_sr_with_a_volumes_note(mr_series: list[Dataset], tmp_path: Path) -> None:
    sr = build(mr_series, report_with(volumes_note="volumetry failed its quality check (registration)"))
    assert require_valid(sr, workdir=tmp_path).ok
    assert "Brain volumes: volumetry failed its quality check (registration)" in texts(reread(sr))


def test_pdf_shows_the_volumes_table_and_no_normative_data(mr_series: list[Dataset], tmp_path: Path) -> None:
    document = render_pdf(mr_series, report_with(volumes=CURRENT, prior=make_prior()), content_datetime=RUN_TIME)

    assert pages(document, tmp_path) == 2
    assert "see page 2" in pdf_text(document, tmp_path, 1)
    text = pdf_text(document, tmp_path, 2)
    assert "no normative data configured" in text
    expected = ["Left hippocampus", f"{3.412:.2f}", f"{100 * 3.412 / 1450:.3f}", f"{3.5:.2f}",
                f"{(3.412 - 3.5) / YEARS:+.3f}", f"{100 * (3.412 - 3.5) / 3.5 / YEARS:+.2f}"]
    assert " ".join(expected) in " ".join(text.split())
    assert "Prior study of 2022-03-04" in text
    assert f"AD {0.62 - 0.5:+.3f} (0.500 to 0.620)" in " ".join(text.split())


def test_pdf_without_a_prior_comparison_names_only_the_volumes(mr_series: list[Dataset], tmp_path: Path) -> None:
    # the comparison is off (no archive to query): page 2 promises no prior study
    document = render_pdf(mr_series, report_with(volumes=CURRENT), content_datetime=RUN_TIME)

    assert pages(document, tmp_path) == 2
    first = " ".join(pdf_text(document, tmp_path, 1).split())
    second = " ".join(pdf_text(document, tmp_path, 2).split())
    assert "Brain volumes: see page 2." in first
    assert "prior" not in first.lower() and "prior" not in second.lower()
    assert second.count("Brain volumes") == 2  # the title and the section


def test_pdf_with_a_normative_table_and_notes(mr_series: list[Dataset], tmp_path: Path) -> None:
    report = report_with(volumes=CURRENT, normative=normative_table(tmp_path),
                         prior_note="prior study not retrievable: the PACS refused the retrieval")
    text = " ".join(pdf_text(render_pdf(mr_series, report, content_datetime=RUN_TIME), tmp_path, 2).split())

    assert "no normative data configured" not in text
    assert "Left hippocampus 3.41 0.235 -0.97 17" in text
    assert "Grey matter 612.40 42.234 no ref. no ref." in text
    assert "Prior study not retrievable: the PACS refused the retrieval" in text


def test_pdf_without_volumes_or_prior_keeps_one_page(mr_series: list[Dataset], tmp_path: Path) -> None:
    assert pages(render_pdf(mr_series, report_with(), content_datetime=RUN_TIME), tmp_path) == 1


def test_two_page_pdf_is_reproducible(mr_series: list[Dataset]) -> None:
    report = report_with(volumes=CURRENT, prior=make_prior(volumes=PRIOR))
    assert render_pdf(mr_series, report, content_datetime=RUN_TIME) == render_pdf(mr_series, report,
                                                                                   content_datetime=RUN_TIME)


def test_a_prior_that_is_not_earlier_gives_no_change_per_year(mr_series: list[Dataset], tmp_path: Path) -> None:
    later = dataclasses.replace(make_prior(), study_date=CURRENT_DATE)
    sr = build(mr_series, report_with(volumes=CURRENT, prior=later))
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    left = groups(back)["Volumetry: left hippocampus"]
    assert value(one(left, PRIOR_VOLUME)) == 3.5
    assert not children(left, VOLUME_CHANGE_PER_YEAR) and not children(left, RELATIVE_CHANGE_PER_YEAR)
    assert any("no per-year change: the study dates give no positive interval" in t for t in texts(back))


def test_a_study_not_analysed_shows_the_notes_but_no_volumes(mr_series: list[Dataset], tmp_path: Path) -> None:
    reason = (Outcome.PROCESSING_ERROR, "the analysis model could not be run.")
    report = report_with(prediction=None, not_analysed=reason, volumes=CURRENT, prior=make_prior(),
                         prior_note="prior study of 2022-03-04 found")
    sr = build(mr_series, report)
    assert require_valid(sr, workdir=tmp_path).ok
    back = reread(sr)

    assert len(groups(back)) == 1
    assert "PertinentOtherEvidenceSequence" not in back
    assert "Comparison with a prior study: prior study of 2022-03-04 found" in texts(back)
    assert not any(t.startswith(("Brain volumes", "Prior study of")) for t in texts(back))
    text = " ".join(pdf_text(render_pdf(mr_series, report, content_datetime=RUN_TIME), tmp_path, 2).split())
    assert "Prior study of 2022-03-04 found" in text and "Left hippocampus" not in text
