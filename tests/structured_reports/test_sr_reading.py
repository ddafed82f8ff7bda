"""The SR as a reader meets it: warnings and summary first, little before them, CN coded as "cognitively normal".

Every SR here is encoded to bytes and read back with pydicom; items are found by their concept codes, spelled
out below as DICOM PS3.16 publishes them (not taken from the code under test).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from core.errors import Outcome
from model.types import Prediction
from structured_reports.concepts import class_for_concept
from structured_reports.types import NotesUsed
from structured_reports.validate import validate_dataset
from tests.conftest import require_tool
from tests.support.sr import build, concept, content_items, make_mr_series, make_report, received_study, reread

# Concept names (CodeValue, CodingSchemeDesignator), PS3.16.
LANGUAGE = ("121049", "DCM")
OBSERVER_TYPE = ("121005", "DCM")
DEVICE_UID = ("121012", "DCM")
DEVICE_NAME = ("121013", "DCM")
PROCEDURE = ("121058", "DCM")
IMAGING_MEASUREMENTS = ("126010", "DCM")
QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
MEASUREMENT_GROUP = ("125007", "DCM")
TRACKING_ID = ("112039", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")
SUMMARY = ("121111", "DCM")
IMPRESSION = ("121073", "DCM")
FINDING = ("121071", "DCM")
COMMENT = ("121106", "DCM")

DEMONSTRATION = "Demonstration model, not for clinical use."
RESEARCH_ONLY = ("For research use only. Not a medical device; not for clinical diagnosis. "
                 "The result must be confirmed by a qualified physician.")
#: The node's own code for the CN class and its coding scheme.
COGNITIVELY_NORMAL = ("CN", "99ADNODE", "Cognitively normal")


def root_items(sr: Dataset) -> list[Dataset]:
    return list(sr.ContentSequence)


def child(items: list[Dataset], name: tuple[str, str]) -> Dataset:
    matches = [item for item in items if concept(item) == name]
    assert len(matches) == 1, (name, [concept(i) for i in items])
    return matches[0]


def readable_texts(sr: Dataset) -> list[tuple[tuple[str, str], str]]:
    """(concept, text) of the Qualitative Evaluations container's items, in order."""
    container = child(root_items(sr), QUALITATIVE_EVALUATIONS)
    return [(concept(item), str(item.TextValue)) for item in container.ContentSequence]


def group_items(sr: Dataset) -> list[Dataset]:
    measurements = child(root_items(sr), IMAGING_MEASUREMENTS)
    return list(child(list(measurements.ContentSequence), MEASUREMENT_GROUP).ContentSequence)


def test_the_root_names_the_device_by_uid_and_name_only_before_the_measurements() -> None:
    report = make_report()
    sr = reread(build(make_mr_series(), report))

    assert [concept(item) for item in root_items(sr)] == [
        LANGUAGE, OBSERVER_TYPE, DEVICE_UID, DEVICE_NAME, PROCEDURE, IMAGING_MEASUREMENTS, QUALITATIVE_EVALUATIONS]
    assert str(child(root_items(sr), DEVICE_UID).UID) == report.device.device_uid
    assert str(child(root_items(sr), DEVICE_NAME).TextValue) == "BRAINAI-NODE-1"


def test_the_warnings_come_first_then_the_summary_then_the_inputs() -> None:
    texts = readable_texts(reread(build(make_mr_series(), make_report())))

    assert texts[0] == (COMMENT, DEMONSTRATION)
    assert texts[1] == (COMMENT, RESEARCH_ONLY)
    assert texts[2] == (SUMMARY, "Most likely class: AD (Alzheimer's disease). "
                                 "Probabilities: AD 0.620, MCI 0.270, CN 0.110.")
    assert "Analysed series 3" in texts[3][1]
    assert texts[4][1] == ("Image quality checks: slices 176 (at least 100); slice thickness 1.00 mm "
                           "(at most 1.5 mm); template correlation 0.912 (at least 0.5); brain coverage 0.998 "
                           "(at least 0.95); WM/GM ratio 1.310 (at least 1.05); all within their limits.")
    assert texts[-1][1].startswith("Model Brain-Adapter version 1.2.0")


def test_a_trained_model_s_report_opens_with_the_research_use_warning() -> None:
    texts = readable_texts(reread(build(make_mr_series(), make_report(demonstration=False))))

    assert texts[0] == (COMMENT, RESEARCH_ONLY)
    assert texts[1][0] == SUMMARY
    assert DEMONSTRATION not in [text for _, text in texts]


def test_the_algorithm_is_named_with_the_four_parameters_a_reader_needs() -> None:
    items = group_items(reread(build(make_mr_series(), make_report())))

    names = [concept(item) for item in items]
    assert names[0] == TRACKING_ID
    assert str(child(items, ALGORITHM_NAME).TextValue) == "Brain-Adapter"
    assert str(child(items, ALGORITHM_VERSION).TextValue) == "1.2.0"
    parameters = [str(item.TextValue) for item in items if concept(item) == ALGORITHM_PARAMETERS]
    assert parameters == ["preset=t1_1mm_mni", "preprocessing_version=preproc-0.5.1",
                          "weights_sha256=" + "3c" * 32, "demonstration_model=true"]
    assert not any("input_shape" in p for p in parameters)  # in the model's manifest, not the report
    assert ("122405", "DCM") not in names  # no Algorithm Manufacturer row: the manufacturer is in the equipment


def test_cn_is_coded_as_cognitively_normal_in_a_declared_local_scheme() -> None:
    report = make_report(prediction=Prediction({"AD": 0.1, "MCI": 0.2, "CN": 0.7}, "CN", True))
    sr = reread(build(make_mr_series(), report))

    items = content_items(sr.ContentSequence)
    impressions = [item for item in items if item.ValueType == "CODE" and concept(item) == IMPRESSION]
    assert len(impressions) == 1
    code = impressions[0].ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == COGNITIVELY_NORMAL
    modifiers = [item.ConceptCodeSequence[0] for item in items if item.ValueType == "CODE" and concept(item) == FINDING]
    assert ("CN", "99ADNODE") in [(c.CodeValue, c.CodingSchemeDesignator) for c in modifiers]
    assert not [c for c in modifiers if (c.CodeValue, c.CodingSchemeDesignator) == ("17621005", "SCT")]

    declared = {item.CodingSchemeDesignator: item for item in sr.CodingSchemeIdentificationSequence}
    assert declared["99ADNODE"].CodingSchemeName == "dicom-node AD/MCI/CN result codes"
    assert declared["99ADNODE"].CodingSchemeResponsibleOrganization == "Brain-Adapter Node Project"
    assert "CodingSchemeRegistry" not in declared["99ADNODE"]  # a local scheme is registered nowhere


def test_class_for_concept_reads_the_local_code_and_the_earlier_snomed_normal() -> None:
    import highdicom as hd

    local = hd.sr.CodedConcept(value="CN", scheme_designator="99ADNODE", meaning="Cognitively normal")
    earlier = hd.sr.CodedConcept(value="17621005", scheme_designator="SCT", meaning="Normal")
    assert class_for_concept(local) == "CN"
    assert class_for_concept(earlier) == "CN"
    with pytest.raises(KeyError, match="99OTHER CN is no class concept"):
        class_for_concept(hd.sr.CodedConcept(value="CN", scheme_designator="99OTHER", meaning="x"))


def test_a_not_analysed_sr_says_what_came_what_is_needed_and_names_no_model() -> None:
    reason = "no suitable 3D T1 series (2 series considered)"
    report = make_report(not_analysed=(Outcome.NO_SUITABLE_SERIES, reason), notes=NotesUsed())
    sr = reread(build(received_study(), report))

    texts = [text for _, text in readable_texts(sr)]
    assert texts[0] == RESEARCH_ONLY  # no "demonstration model" sentence: no model gave anything here
    assert readable_texts(sr)[1] == (IMPRESSION, "Not analysed: " + reason)
    assert texts[2] == 'Received: series 1 "localizer" (MR, 3 images); series 2 "t2_tse_tra" (MR, 2 images).'
    assert "with at least 120 slices and a slice thickness of at most 1.2 mm" in texts[3]
    assert texts[3].startswith("The node needs a 3D T1-weighted MR series")
    assert texts[4] == "No model was run; no clinical note was used."
    assert texts[-1] == "Node BRAINAI-NODE-1 software 0.3.0; run run-0042."
    everything = " ".join(str(item.get("TextValue", "")) for item in content_items(sr.ContentSequence))
    for model_word in ("Brain-Adapter", "1.2.0", "weights", "preproc-0.5.1", "Series analysed", "Analysed series"):
        assert model_word not in everything, model_word
    assert ALGORITHM_NAME not in [concept(item) for item in group_items(sr)]
    equipment = [e.get("ManufacturerModelName") for e in sr.ContributingEquipmentSequence]
    assert "Brain-Adapter DICOM Node" in equipment and "Brain-Adapter" not in equipment  # the node, no model


def test_a_processing_error_does_not_blame_the_series() -> None:
    reason = "image preprocessing could not be completed. The failure was recorded for the node's administrators."
    report = make_report(not_analysed=(Outcome.PROCESSING_ERROR, reason), notes=NotesUsed())
    texts = [text for _, text in readable_texts(reread(build(make_mr_series(), report)))]

    assert "Not analysed: " + reason in texts
    assert not [text for text in texts if "node needs" in text]


@pytest.mark.parametrize("kind", ["analysed CN", "not analysed"])
def test_dciodvfy_finds_nothing_but_the_declared_local_scheme(kind: str, tmp_path: Path) -> None:
    if kind == "analysed CN":
        report = make_report(prediction=Prediction({"AD": 0.1, "MCI": 0.2, "CN": 0.7}, "CN", True))
        sources = make_mr_series()
    else:
        report = make_report(not_analysed=(Outcome.QC_FAILED, "slices too thick: measured 5 mm, limit 1.5 mm"),
                             notes=NotesUsed())
        sources = received_study()
    sr = build(sources, report)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)

    raw = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    findings = [line for line in (raw.stdout + raw.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    assert set(findings) <= {"Warning - Unrecognized defined term <99ADNODE> for value 1 of attribute "
                             "<Coding Scheme Designator>"}
    result = validate_dataset(sr, workdir=tmp_path)
    assert (result.errors, result.warnings) == ([], [])
    assert len(result.accepted) == len(findings)


def test_an_undeclared_local_scheme_still_warns(tmp_path: Path) -> None:
    report = make_report(prediction=Prediction({"AD": 0.1, "MCI": 0.2, "CN": 0.7}, "CN", True))
    sr = build(make_mr_series(), report)
    del sr.CodingSchemeIdentificationSequence

    result = validate_dataset(sr, workdir=tmp_path)
    assert result.ok
    assert result.accepted == []
    assert result.warnings and all("<99ADNODE>" in w for w in result.warnings)
