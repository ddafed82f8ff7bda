"""The SR builder's details, one by one: header attributes, equipment, tracking, the checks of its input.

Each test pins a decision of :mod:`structured_reports.sr` that the round-trip
tests of ``test_sr.py`` leave open; most were written against a mutant that
survived them (docs/mutation.md).  Expected values are the report input's
own values (:func:`tests.support.sr.make_report`) or the standard's codes.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes

from core.errors import Outcome
from model.types import Prediction
from structured_reports.sources import representative_image, with_type2_defaults
from structured_reports.sr import SR_SERIES_DESCRIPTION, algorithm_parameters, build_sr
from structured_reports.types import NotesUsed, ReportError
from structured_reports.uids import UidKind, derive_uid
from tests.support.sr import NOTE_DATES, RUN_TIME, build, concept, content_items, make_mr_series, make_report

TRACKING_UID = ("112040", "DCM")
TRACKING_ID = ("112039", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")
FINDING_SITE = ("363698007", "SCT")
NOT_ANALYSED = make_report(not_analysed=(Outcome.NO_SUITABLE_SERIES, "no T1"))


@pytest.fixture(scope="module")
def series() -> list[Dataset]:
    return make_mr_series()


def _values(sr: Dataset, name: tuple[str, str]) -> list[str]:
    """The values (text, UID or code meaning) of the content items named *name*."""
    found = []
    for item in content_items(sr.ContentSequence):
        if concept(item) != name:
            continue
        value = item.get("TextValue") or item.get("UID")
        if value is None and "ConceptCodeSequence" in item:
            value = item.ConceptCodeSequence[0].CodeMeaning
        found.append(str(value))
    return found


def test_the_sr_header_names_the_device_and_is_preliminary_and_unverified(series: list[Dataset]) -> None:
    report = make_report()
    sr = build(series, report)
    assert sr.SeriesDescription == SR_SERIES_DESCRIPTION == "AI result AD/MCI/CN (research use only)"
    assert (sr.Manufacturer, sr.ManufacturerModelName, sr.SoftwareVersions, sr.DeviceSerialNumber) == (
        "Example Research Lab", "Brain-Adapter DICOM Node", "0.3.0", "NODE-0001")
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")


def test_the_instance_number_is_one_unless_given(series: list[Dataset]) -> None:
    sr = build_sr(series, make_report(), series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=9901,
                  content_datetime=RUN_TIME)
    assert sr.InstanceNumber == 1
    assert build(series, make_report(), instance_number=3).InstanceNumber == 3


def test_the_tracking_uid_names_study_series_and_weights(series: list[Dataset]) -> None:
    first = series[0]
    report = make_report()
    expected = derive_uid(str(first.StudyInstanceUID), str(first.SeriesInstanceUID), "3c" * 32, UidKind.TRACKING)
    assert _values(build(series, report), TRACKING_UID) == [expected]
    other_weights = dataclasses.replace(report, model=dataclasses.replace(report.model, weights_sha256="3d" * 32))
    assert _values(build(series, other_weights), TRACKING_UID) != [expected]
    given = build_sr(series, report, series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=9901,
                     content_datetime=RUN_TIME, tracking_uid="2.25.77")
    assert _values(given, TRACKING_UID) == ["2.25.77"]


def test_the_tracking_identifier_names_model_and_series(series: list[Dataset]) -> None:
    assert _values(build(series, make_report()), TRACKING_ID) == ["Brain-Adapter AD/MCI/CN classification, series 3"]
    unnumbered = copy.deepcopy(series)
    for ds in unnumbered:
        del ds.SeriesNumber
    assert _values(build(unnumbered, make_report()), TRACKING_ID) == ["Brain-Adapter AD/MCI/CN classification"]
    for ds in unnumbered:
        ds.SeriesNumber = None
    assert _values(build(unnumbered, make_report()), TRACKING_ID) == ["Brain-Adapter AD/MCI/CN classification"]
    assert _values(build(series, NOT_ANALYSED), TRACKING_ID) == ["AD/MCI/CN classification, not analysed"]


def test_the_algorithm_is_named_only_when_a_model_ran(series: list[Dataset]) -> None:
    report = make_report()
    sr = build(series, report)
    assert _values(sr, ALGORITHM_NAME) == ["Brain-Adapter"]
    assert _values(sr, ALGORITHM_PARAMETERS) == algorithm_parameters(report)
    assert _values(build(series, NOT_ANALYSED), ALGORITHM_NAME) == []


def test_the_algorithm_parameters_a_reader_needs() -> None:
    report = make_report()
    assert algorithm_parameters(report) == ["preset=t1_1mm_mni", "preprocessing_version=preproc-0.5.1",
                                            f"weights_sha256={'3c' * 32}", "demonstration_model=true"]
    trained = make_report(demonstration=False)
    trained = dataclasses.replace(trained, model=dataclasses.replace(trained.model, parameters={}))
    assert algorithm_parameters(trained) == ["preprocessing_version=preproc-0.5.1", f"weights_sha256={'3c' * 32}"]


def test_the_finding_site_is_the_brain_analysed_or_not(series: list[Dataset]) -> None:
    for report in (make_report(), NOT_ANALYSED):
        assert _values(build(series, report), FINDING_SITE) == [codes.SCT.Brain.meaning]


def test_a_single_instance_is_enough(series: list[Dataset]) -> None:
    sr = build(series[:1], make_report())
    assert _values(sr, TRACKING_ID) == ["Brain-Adapter AD/MCI/CN classification, series 3"]


def _ours(sr: Dataset) -> list[Dataset]:
    """The node's and the algorithm's entries of the contributing equipment (highdicom adds the scanner and
    itself)."""
    return [e for e in sr.ContributingEquipmentSequence
            if str(e.ContributionDescription).startswith(("DICOM node", "AI algorithm"))]


def test_the_contributing_equipment_node_and_algorithm(series: list[Dataset]) -> None:
    report = make_report()
    device = dataclasses.replace(report.device, name="BRAINAI-NODE-WITH-A-LONG-NAME")
    model = dataclasses.replace(report.model, name="M" * 70, version="v" * 70)
    report = dataclasses.replace(report, device=device, model=model, preprocessing_version="p" * 70)
    node, algorithm = _ours(build(series, report))
    when = "20240304123005"
    assert (node.Manufacturer, node.ManufacturerModelName, node.SoftwareVersions, node.DeviceSerialNumber,
            node.StationName, node.ContributionDescription) == (
        "Example Research Lab", "Brain-Adapter DICOM Node", "0.3.0", "NODE-0001", "BRAINAI-NODE-WIT",
        "DICOM node that ran the analysis and wrote this report")
    assert str(node.ContributionDateTime).startswith(when)
    assert str(algorithm.ContributionDateTime).startswith(when)
    assert (algorithm.Manufacturer, algorithm.ManufacturerModelName, list(algorithm.SoftwareVersions)) == (
        "Example Research Lab", "M" * 64, ["v" * 64, "p" * 64])
    assert algorithm.ContributionDescription == ("AI algorithm " + "M" * 70)[:64]
    for equipment in (node, algorithm):
        code = equipment.PurposeOfReferenceCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == ("109102", "DCM")  # Processing Equipment


def test_the_algorithm_equipment_says_demonstration(series: list[Dataset]) -> None:
    demo = _ours(build(series, make_report()))[1]
    assert demo.ContributionDescription == "AI algorithm Brain-Adapter 1.2.0 (demonstration model)"
    trained = _ours(build(series, make_report(demonstration=False)))[1]
    assert trained.ContributionDescription == "AI algorithm Brain-Adapter 1.2.0"
    assert len(_ours(build(series, NOT_ANALYSED))) == 1


def _numbered(number: object) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    if number is not None:
        ds.InstanceNumber = number
    return ds


def test_the_representative_image_is_the_middle_one_by_instance_number() -> None:
    one, absent, five, empty, seven = (_numbered(n) for n in (1, None, 5, "", 7))
    # absent and empty count as 0: ordered absent, empty, 1, 5, 7
    assert representative_image([one, absent, five, empty, seven]) is one
    assert representative_image([seven, five, one]) is five


def test_type2_defaults_keep_the_file_meta() -> None:
    source = Dataset()
    source.PatientName = "Doe^Jane"
    source.file_meta = FileMetaDataset()
    source.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    patched = with_type2_defaults(source)
    assert patched is not source and patched.file_meta is source.file_meta
    assert (patched.PatientName, patched.PatientID, patched.StudyDate) == ("Doe^Jane", "", "")


@pytest.mark.parametrize(("probabilities", "message"), [
    ({"AD": 1.5, "MCI": 0.0, "CN": -0.5}, r"^class probabilities must lie in \[0, 1\]$"),
    ({"AD": 1.5, "MCI": 0.0, "CN": 0.0}, r"^class probabilities must lie in \[0, 1\]$"),
    ({"AD": math.nan, "MCI": 0.5, "CN": 0.5}, r"^class probabilities must lie in \[0, 1\]$"),
    ({"AD": 0.5, "MCI": 0.25, "CN": 0.2}, r"^class probabilities sum to 0\.950000, not 1$"),
])
def test_probabilities_outside_their_range_are_refused(series: list[Dataset], probabilities: dict[str, float],
                                                       message: str) -> None:
    report = make_report(prediction=Prediction(probabilities, "AD", used_note=True))
    with pytest.raises(ReportError, match=message):
        build(series, report)


def test_probabilities_at_their_bounds_are_accepted(series: list[Dataset]) -> None:
    build(series, make_report(prediction=Prediction({"AD": 1.0, "MCI": 0.0, "CN": 0.0}, "AD", used_note=True)))


def test_one_note_is_a_note_used(series: list[Dataset]) -> None:
    one = NotesUsed(NOTE_DATES[:1])
    build(series, make_report(notes=one, prediction=Prediction({"AD": 0.5, "MCI": 0.3, "CN": 0.2}, "AD",
                                                               used_note=True)))


def test_the_input_checks_name_what_is_missing(series: list[Dataset]) -> None:
    with pytest.raises(ReportError, match=r"^an SR needs at least one source instance$"):
        build_sr([], make_report(), series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=1)
    both = dataclasses.replace(make_report(), not_analysed=(Outcome.NO_SUITABLE_SERIES, "no T1"))
    with pytest.raises(ReportError, match=r"^exactly one of prediction and not_analysed must be set$"):
        build(series, both)


def _texts(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in content_items(sr.ContentSequence) if "TextValue" in item]


def test_the_reader_learns_which_series_was_analysed_and_its_quality(series: list[Dataset]) -> None:
    texts = _texts(build(series, make_report()))
    assert ('Analysed series 3 "t1_mprage_sag_p2_iso" (5 images): one representative image is referenced as the '
            "source; every image is listed in the evidence.") in texts
    assert any(t.startswith("Image quality checks: slices 176 (at least 100); ") for t in texts)


def test_the_reader_learns_what_was_received_and_what_is_needed(series: list[Dataset]) -> None:
    texts = _texts(build(series, NOT_ANALYSED))
    assert 'Received: series 3 "t1_mprage_sag_p2_iso" (MR, 5 images).' in texts
    needed = [t for t in texts if t.startswith("The node needs ")]
    assert len(needed) == 1
    assert needed[0].endswith("with at least 120 slices and a slice thickness of at most 1.2 mm.")


def test_an_empty_series_number_is_left_out_of_the_tracking_identifier(series: list[Dataset]) -> None:
    empty = copy.deepcopy(series)
    for ds in empty:
        ds.SeriesNumber = ""
    assert _values(build(empty, make_report()), TRACKING_ID) == ["Brain-Adapter AD/MCI/CN classification"]
