"""Tests of structured_reports.sr: the TID 1500 Comprehensive 3D SR.

A small T1 MR series (headers of a typical 3D MPRAGE, 8x8 pixels, made by
:func:`tests.support.sr.make_mr_series`), read back header-only as the node does,
is reported on.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from html import unescape
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    generate_uid,
)

from core.errors import Outcome
from model.types import CLASSES, Prediction
from structured_reports.concepts import CLASS_CONCEPTS, class_for_concept
from structured_reports.sr import (
    DEMONSTRATION_TEXT,
    FINDING_NAME,
    NOT_ANALYSED_PREFIX,
    PROBABILITY_CLASS_NAME,
    build_sr,
)
from structured_reports.types import (
    DISCLAIMER,
    NotesUsed,
    ReportError,
)
from structured_reports.uids import UidKind, derive_uid
from structured_reports.validate import require_valid
from tests.support.sr import (
    PROBABILITIES,
    build,
    make_mr_series,
    make_report,
)


def roundtrip(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    """Encode to bytes, decode, and re-read with highdicom."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(buffer))


def tree(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The TID 1500 content of a re-read SR."""
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def texts(sr: hd.sr.Comprehensive3DSR) -> list[str]:
    """Values of all TEXT items of the content tree."""
    items = hd.sr.utils.find_content_items(
        sr, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True
    )
    return [str(item.TextValue) for item in items]


@pytest.fixture(scope="module")
def mr_series() -> list[Dataset]:
    return make_mr_series()


@pytest.fixture(scope="module")
def sr_file(mr_series: list[Dataset], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    pydicom.dcmwrite(path, build(mr_series, make_report()), enforce_file_format=True)
    return path


def test_sr_round_trip_carries_the_result(mr_series: list[Dataset]) -> None:
    sr = roundtrip(build(mr_series, make_report()))

    assert sr.SOPClassUID == Comprehensive3DSRStorage
    assert sr.Modality == "SR"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert isinstance(sr.content, hd.sr.MeasurementReport)

    groups = tree(sr).get_image_measurement_groups()
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_uid is not None
    assert group.tracking_identifier is not None
    assert "Brain-Adapter" in group.tracking_identifier
    findings = group.get_qualitative_evaluations(name=FINDING_NAME)
    assert len(findings) == 1
    assert class_for_concept(findings[0][0].value) == "AD"

    probabilities = group.get_measurements(name=codes.DCM.Probability)
    assert len(probabilities) == len(CLASSES)
    by_class = {}
    for item in probabilities:
        assert item.unit == codes.UCUM.NoUnits
        modifier = hd.sr.utils.find_content_items(item[0], name=PROBABILITY_CLASS_NAME)[0]
        by_class[class_for_concept(modifier.value)] = float(item.value)
    assert by_class == pytest.approx(PROBABILITIES)
    assert sum(by_class.values()) == pytest.approx(1.0)


def test_sr_keeps_patient_study_and_evidence(mr_series: list[Dataset]) -> None:
    sr = roundtrip(build(mr_series, make_report()))

    source = mr_series[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate",
                    "PatientSex", "AccessionNumber", "StudyDate", "StudyID"):
        assert sr[keyword].value == source[keyword].value, keyword
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID

    evidence = {sop_uid for _, _, sop_uid, _ in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in mr_series}
    referenced = [
        item.referenced_sop_instance_uid
        for item in tree(sr).get_image_measurement_groups()[0].source_images
    ]
    middle = sorted(mr_series, key=lambda ds: int(ds.InstanceNumber))[len(mr_series) // 2]
    assert referenced == [middle.SOPInstanceUID]  # one readable line; all instances in the evidence


def test_sr_names_device_algorithm_and_equipment(mr_series: list[Dataset]) -> None:
    report = make_report()
    sr = roundtrip(build(mr_series, report))

    observers = tree(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    assert len(observers) == 1
    attributes = observers[0].observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == report.device.device_uid
    assert attributes.name == report.device.name
    # Only UID and name before the result; the rest of the device is in the Contributing Equipment Sequence.
    assert (attributes.manufacturer_name, attributes.model_name, attributes.serial_number) == (None, None, None)
    assert report.device.serial_number in [e.get("DeviceSerialNumber") for e in sr.ContributingEquipmentSequence]

    algorithm = {
        item.name.meaning: str(item.value)
        for item in hd.sr.utils.find_content_items(
            tree(sr).get_image_measurement_groups()[0][0],
            value_type=hd.sr.ValueTypeValues.TEXT,
        )
    }
    assert algorithm["Algorithm Name"] == "Brain-Adapter"
    assert algorithm["Algorithm Version"] == "1.2.0"

    equipment = [(e.Manufacturer, e.get("ManufacturerModelName")) for e in sr.ContributingEquipmentSequence]
    assert (report.device.manufacturer, report.device.model_name) in equipment
    assert (report.device.manufacturer, report.model.name) in equipment
    assert sr.Manufacturer == report.device.manufacturer


def test_sr_text_for_the_radiologist(mr_series: list[Dataset]) -> None:
    values = texts(roundtrip(build(mr_series, make_report())))

    assert DISCLAIMER in values
    assert DEMONSTRATION_TEXT in values
    notes = [v for v in values if "clinical note" in v]
    assert len(notes) == 1
    assert "2 clinical notes" in notes[0]
    assert "2023-11-20, 2024-03-01" in notes[0]
    assert any("preproc-0.5.1" in v and "1.2.0" in v for v in values)
    assert any(v.startswith("Most likely class: AD") for v in values)


def test_sr_image_only_and_trained_model(mr_series: list[Dataset]) -> None:
    values = texts(roundtrip(build(mr_series, make_report(notes=NotesUsed(), demonstration=False))))

    assert any("No clinical note was used" in v for v in values)
    assert DEMONSTRATION_TEXT not in values
    assert DISCLAIMER in values


def test_sr_is_valid_for_dciodvfy_and_dcmtk(mr_series: list[Dataset], tmp_path: Path) -> None:
    result = require_valid(build(mr_series, make_report()), workdir=tmp_path)

    assert result.ok
    assert result.errors == []
    assert result.warnings == []


def test_dsr2html_shows_class_probabilities_and_disclaimer(sr_file: Path) -> None:
    html = subprocess.run(
        ["/usr/bin/dsr2html", str(sr_file)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    text = " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())

    assert "Impression: Alzheimer's disease (26929004, SCT)" in text
    for label, meaning in (("AD", "Alzheimer's disease"), ("MCI", "Mild cognitive impairment"),
                           ("CN", "Cognitively normal")):
        assert f"Probability: {PROBABILITIES[label]} 1 Concept Modifier : Finding = {meaning}" in text
    assert DISCLAIMER in text
    assert DEMONSTRATION_TEXT in text
    assert "Verification Flag: UNVERIFIED" in text


def test_dsrdump_reads_sr(sr_file: Path) -> None:
    result = subprocess.run(
        ["/usr/bin/dsrdump", "+Pl", str(sr_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0
    assert result.stderr == ""
    assert "Comprehensive 3D SR Document" in result.stdout
    assert '(26929004,SCT,"Alzheimer\'s disease")' in result.stdout
    assert "Completion Flag     : COMPLETE" in result.stdout


@pytest.mark.parametrize("outcome", list(Outcome))
def test_not_analysed_outcome_yields_valid_sr(
    mr_series: list[Dataset], outcome: Outcome, tmp_path: Path
) -> None:
    reason = f"example reason ({outcome.value})"
    report = make_report(not_analysed=(outcome, reason), notes=NotesUsed())
    sr = build(mr_series, report)

    require_valid(sr, workdir=tmp_path)
    reread = roundtrip(sr)
    values = texts(reread)
    assert NOT_ANALYSED_PREFIX + reason in values
    assert DISCLAIMER in values
    group = tree(reread).get_image_measurement_groups()[0]
    assert group.get_measurements() == []
    assert group.get_qualitative_evaluations() == []
    assert reread.CompletionFlag == "COMPLETE"


def test_superseding_sr_references_predecessor(mr_series: list[Dataset], tmp_path: Path) -> None:
    first = roundtrip(build(mr_series, make_report()))
    corrected = make_report(
        prediction=Prediction(
            probabilities={"AD": 0.3, "MCI": 0.6, "CN": 0.1}, predicted_class="MCI", used_note=True
        )
    )
    second = build(mr_series, corrected, predecessor=first, instance_number=2)

    require_valid(second, workdir=tmp_path)
    reread = roundtrip(second)
    predecessor = reread.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first.StudyInstanceUID
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == Comprehensive3DSRStorage
    assert any(
        "supersedes" in v and str(first.SOPInstanceUID) in v for v in texts(reread)
    )
    assert reread.SOPInstanceUID != first.SOPInstanceUID


def test_replay_builds_the_same_object(mr_series: list[Dataset]) -> None:
    one = build(mr_series, make_report())
    two = build(mr_series, make_report())

    source = mr_series[0]  # the UIDs given to the builder (tests.support.sr.build), used as given, both times
    identity = (str(source.StudyInstanceUID), str(source.SeriesInstanceUID), "in" * 32, "3c" * 32)
    assert one.SOPInstanceUID == two.SOPInstanceUID == derive_uid(*identity, "1", UidKind.SR_INSTANCE)
    assert one.SeriesInstanceUID == two.SeriesInstanceUID == derive_uid(*identity, UidKind.SR_SERIES)
    assert one.ContentSequence == two.ContentSequence
    assert str(one.ContentDate) == "20240304"
    assert str(one.ContentTime).startswith("123005")


def test_class_concepts_cover_model_classes() -> None:
    assert set(CLASS_CONCEPTS) == set(CLASSES)
    assert len({(c.scheme_designator, c.value) for c in CLASS_CONCEPTS.values()}) == len(CLASSES)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"not_analysed": (Outcome.QC_FAILED, "blurred")}, "exactly one"),
        ({"prediction": None}, "exactly one"),
        (
            {"prediction": Prediction({"AD": 0.5, "MCI": 0.4, "CN": 0.4}, "AD", True)},
            "sum to",
        ),
        ({"prediction": Prediction({"AD": 0.5, "MCI": 0.5}, "AD", True)}, "expected"),
        (
            {"prediction": Prediction({"AD": 0.5, "MCI": 0.4, "CN": 0.1}, "FTD", True)},
            "unknown predicted class",
        ),
        (
            {"prediction": Prediction({"AD": 0.5, "MCI": 0.4, "CN": 0.1}, "AD", False)},
            "used_note",
        ),
    ],
)
def test_build_sr_rejects_inconsistent_input(
    mr_series: list[Dataset], change: dict[str, object], message: str
) -> None:
    report = dataclasses.replace(make_report(), **change)  # type: ignore[arg-type]

    with pytest.raises(ReportError, match=message):
        build(mr_series, report)


def test_build_sr_rejects_missing_sources() -> None:
    with pytest.raises(ReportError, match="at least one source"):
        build_sr(
            [],
            make_report(),
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=9901,
        )


def test_build_sr_rejects_mixed_studies(mr_series: list[Dataset]) -> None:
    other = make_mr_series(1)
    with pytest.raises(ReportError, match="2 studies"):
        build([*mr_series, *other], make_report())


def test_sr_from_headers_without_optional_type2_values(tmp_path: Path) -> None:
    sparse = make_mr_series(2)
    omitted = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName")
    for ds in sparse:
        for keyword in omitted:
            delattr(ds, keyword)

    sr = build(sparse, make_report())

    require_valid(sr, workdir=tmp_path)
    assert all(keyword not in sparse[0] for keyword in omitted)
    assert sr.PatientName == ""
    assert sr.PatientID == sparse[0].PatientID


def test_long_model_name_and_version_still_give_a_valid_sr(mr_series: list[Dataset], tmp_path: Path) -> None:
    from dataclasses import replace

    report = make_report()
    long_model = replace(report.model, name="Brain-Adapter demonstration (trained on synthetic data, not for "
                                            "clinical use) " * 2, version="1.2.0+" + "x" * 80)
    sr = build(mr_series, replace(report, model=long_model))
    assert require_valid(sr, workdir=tmp_path).ok
    assert any(long_model.name in text for text in texts(roundtrip(sr)))  # the full name stays in the text items


def test_a_japanese_source_s_character_set_is_written_as_highdicom_requires() -> None:
    """PS3.5 writes the default repertoire as an empty first value; highdicom wants ISO 2022 IR 6 (found by chaos)."""
    sources = make_mr_series(4)
    for ds in sources:
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = "Yamada^Tarou=山田^太郎"
    sr = build(sources, make_report())
    assert list(sr.SpecificCharacterSet) == ["ISO 2022 IR 6", "ISO 2022 IR 87"]
    assert str(roundtrip(sr).PatientName) == "Yamada^Tarou=山田^太郎"
