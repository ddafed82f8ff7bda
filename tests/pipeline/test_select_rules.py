"""Each rule of config/series_selection.toml on its own, on header-only candidates made here.

A header (:func:`tests.support.selection.t1_header`) that passes every
``[[require]]`` rule and matches every ``[[score]]`` rule is changed in exactly
one attribute; the decision must then name exactly
that one rule.  A rejection that another rule would also catch proves nothing
about the first, so every case below fails one rule and only one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import (
    CTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
)

from core.errors import ConfigError
from pipeline.select import DEFAULT_RULES_PATH, SelectionRules, SeriesCandidate, load_rules
from tests.support.selection import candidate, decide, t1_header, winner

BASE_SCORE = 7.0
ALL_SCORES = ["+2 T1 protocol name", "+1 T1 protocol in ProtocolName", "+1 T1 3D sequence name",
              "+1 inversion-prepared gradient echo", "+1 T1 inversion time", "+0.5 magnetization prepared",
              "+0.5 about 1 mm in-plane"]
ORIGINAL_PRIMARY = "rejected: original primary image (not derived, reformatted, localizer or diffusion)"
GRADIENT_ECHO = "rejected: gradient echo (not spin echo / FLAIR / EPI)"
DESCRIPTION = "rejected: description is not T2, FLAIR, diffusion, localizer or reformat"


@pytest.fixture
def rules() -> SelectionRules:
    """The shipped rules, read for every test (cheap; and so every test exercises the parser)."""
    return load_rules(DEFAULT_RULES_PATH)


def test_the_reference_header_passes_every_rule_and_matches_every_score(rules: SelectionRules) -> None:
    decision = decide(rules, candidate())
    assert decision.accepted and decision.score == BASE_SCORE
    assert decision.reasons == ALL_SCORES
    assert (decision.description, decision.modality) == ("t1_mprage_sag_p2_iso", "MR")


REJECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "CT modality": ({"Modality": "CT"}, "rejected: modality is MR"),
    "no modality": ({"Modality": None}, "rejected: modality is MR"),
    "CT storage": ({"SOPClassUID": CTImageStorage}, "rejected: MR image storage"),
    "not primary": ({"ImageType": ["ORIGINAL", "M", "ND"]}, ORIGINAL_PRIMARY),
    "not original": ({"ImageType": ["PRIMARY", "M", "ND"]}, ORIGINAL_PRIMARY),
    "no image type": ({"ImageType": None}, ORIGINAL_PRIMARY),
    "2D": ({"MRAcquisitionType": "2D"}, "rejected: 3D acquisition"),
    "no acquisition type": ({"MRAcquisitionType": None}, "rejected: 3D acquisition"),
    "spin echo only": ({"ScanningSequence": ["SE"]}, GRADIENT_ECHO),
    "gradient and spin echo": ({"ScanningSequence": ["GR", "SE"]}, GRADIENT_ECHO),
    "gradient echo EPI": ({"ScanningSequence": ["GR", "EP"]}, GRADIENT_ECHO),
    "no sequence": ({"ScanningSequence": None}, GRADIENT_ECHO),
    "long echo": ({"EchoTime": 10.01}, "rejected: short echo time (T1-weighted)"),
    "too short echo": ({"EchoTime": 0.49}, "rejected: short echo time (T1-weighted)"),
    "thick slices": ({"SliceThickness": 1.51}, "rejected: slice thickness at most 1.5 mm"),
    "too thin slices": ({"SliceThickness": 0.29}, "rejected: slice thickness at most 1.5 mm"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_each_requirement_alone_rejects(rules: SelectionRules, case: str) -> None:
    change, reason = REJECTIONS[case]
    decision = decide(rules, candidate(**change))
    assert not decision.accepted and decision.score == 0
    assert decision.reasons == [reason]


EXCLUDED_IMAGE_TYPES = ["DERIVED", "SECONDARY", "MPR", "REFORMATTED", "PROJECTION IMAGE", "LOCALIZER", "MIP",
                        "DIFFUSION", "ADC", "TRACEW", "FA", "MOSAIC", "SUBTRACTION", "PERFUSION", "MOCO"]


@pytest.mark.parametrize("value", EXCLUDED_IMAGE_TYPES)
def test_each_excluded_image_type_alone_rejects(rules: SelectionRules, value: str) -> None:
    decision = decide(rules, candidate(ImageType=["ORIGINAL", "PRIMARY", "M", value.lower()]))
    assert decision.reasons == [ORIGINAL_PRIMARY]


@pytest.mark.parametrize("value", ["SPIN", "BOTH"])
def test_enhanced_echo_pulse_sequence_spin_or_both_rejects(rules: SelectionRules, value: str) -> None:
    decision = decide(rules, candidate(ScanningSequence=None, EchoPulseSequence=value))
    assert decision.reasons == [GRADIENT_ECHO]


def test_enhanced_echo_pulse_sequence_gradient_is_accepted(rules: SelectionRules) -> None:
    decision = decide(rules, candidate(ScanningSequence=None, EchoPulseSequence="GRADIENT"))
    assert decision.accepted
    assert "+1 inversion-prepared gradient echo" not in decision.reasons  # ScanningSequence is absent


@pytest.mark.parametrize("description", [
    "t2_spc_sag", "FLAIR 3D", "dark_fluid", "darkfluid", "ep2d_dwi", "diffusion", "dti_30dir", "ADC map",
    "localizer", "AAHead_Scout", "localiser", "Survey", "3pl loc", "3-plane", "MPR tra", "reformat",
    "SWI", "TOF angio", "perfusion", "MIP cor"])
def test_each_excluded_description_alone_rejects(rules: SelectionRules, description: str) -> None:
    decision = decide(rules, candidate(SeriesDescription=description))
    assert decision.reasons == [DESCRIPTION]


@pytest.mark.parametrize("description", ["t1_mprage_sag", "mprage_adcx", "t1 3d swirl", "top_brain", "mipr"])
def test_descriptions_that_only_contain_an_excluded_word_pass(rules: SelectionRules, description: str) -> None:
    assert decide(rules, candidate(SeriesDescription=description)).accepted


@pytest.mark.parametrize("change", [
    {"EchoTime": 0.5}, {"EchoTime": 10.0}, {"EchoTime": None}, {"EchoTime": None, "EffectiveEchoTime": 3.0},
    {"SliceThickness": 1.5}, {"SliceThickness": 0.3}, {"SliceThickness": None}, {"SeriesDescription": None},
    {"SOPClassUID": EnhancedMRImageStorage}, {"SOPClassUID": LegacyConvertedEnhancedMRImageStorage},
    {"Modality": "mr"}, {"MRAcquisitionType": "3d"}, {"ImageType": ["original", "primary"]},
])
def test_inclusive_bounds_missing_ok_and_case_pass(rules: SelectionRules, change: dict[str, Any]) -> None:
    assert decide(rules, candidate(**change)).accepted


def test_effective_echo_time_is_read_when_echo_time_is_absent(rules: SelectionRules) -> None:
    decision = decide(rules, candidate(EchoTime=None, EffectiveEchoTime=30.0))
    assert decision.reasons == ["rejected: short echo time (T1-weighted)"]


def test_the_slice_count_requirement_counts_instances_and_frames(rules: SelectionRules) -> None:
    assert decide(rules, candidate(slices=99)).reasons == ["rejected: at least 100 slices"]
    assert decide(rules, candidate(slices=100)).accepted
    multiframe = t1_header(NumberOfFrames=176)
    assert decide(rules, SeriesCandidate("1.2.3.4", [multiframe])).accepted
    multiframe.NumberOfFrames = 99
    assert decide(rules, SeriesCandidate("1.2.3.4", [multiframe])).reasons == ["rejected: at least 100 slices"]


def test_mixed_orientations_alone_reject(rules: SelectionRules) -> None:
    sagittal = t1_header()
    axial = t1_header(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    decision = decide(rules, SeriesCandidate("1.2.3.5", [sagittal] * 60 + [axial] * 60))
    assert decision.reasons == ["rejected: one slice orientation"]
    assert decide(rules, SeriesCandidate("1.2.3.6", [axial] * 120)).accepted


def test_a_series_without_instances_is_rejected(rules: SelectionRules) -> None:
    decision = decide(rules, SeriesCandidate("1.2.3.7", []))
    assert not decision.accepted and decision.score == 0
    assert decision.reasons[-1] == "rejected: no instances"


BARE: dict[str, Any] = {"SeriesDescription": "brain 3d", "ProtocolName": None, "SequenceName": None,
                        "ScanningSequence": ["GR"], "InversionTime": None, "SequenceVariant": None,
                        "PixelSpacing": None}
SCORES: dict[str, tuple[dict[str, Any], float, str]] = {
    "description": ({"SeriesDescription": "sag bravo"}, 2.0, "+2 T1 protocol name"),
    "protocol": ({"ProtocolName": "3D FSPGR"}, 1.0, "+1 T1 protocol in ProtocolName"),
    "sequence name": ({"SequenceName": "efgre3d"}, 1.0, "+1 T1 3D sequence name"),
    "inversion prepared": ({"ScanningSequence": ["GR", "IR"]}, 1.0, "+1 inversion-prepared gradient echo"),
    "inversion time": ({"InversionTime": 1300.0}, 1.0, "+1 T1 inversion time"),
    "inversion times": ({"InversionTimes": [300.0]}, 1.0, "+1 T1 inversion time"),
    "prepared": ({"SequenceVariant": ["SP", "MP"]}, 0.5, "+0.5 magnetization prepared"),
    "pixel spacing": ({"PixelSpacing": [0.7, 0.7]}, 0.5, "+0.5 about 1 mm in-plane"),
}


@pytest.mark.parametrize("case", list(SCORES))
def test_each_score_rule_alone_adds_its_points(case: str) -> None:
    change, points, reason = SCORES[case]
    rules = load_rules(DEFAULT_RULES_PATH)
    lenient = SelectionRules(rules.requirements, rules.scores, min_score=0.0)
    decision = decide(lenient, candidate(**{**BARE, **change}))
    assert decision.accepted and decision.score == points
    assert decision.reasons == [reason]


@pytest.mark.parametrize("change", [
    {"InversionTime": 299.0}, {"InversionTime": 1301.0}, {"PixelSpacing": [1.31, 1.31]},
    {"PixelSpacing": [0.69, 0.69]}, {"SequenceVariant": ["SP"]}, {"ScanningSequence": ["GR", "SP"]},
    {"SeriesDescription": "brain fast"},
])
def test_near_misses_of_score_rules_add_nothing(change: dict[str, Any]) -> None:
    rules = load_rules(DEFAULT_RULES_PATH)
    lenient = SelectionRules(rules.requirements, rules.scores, min_score=0.0)
    decision = decide(lenient, candidate(**{**BARE, **change}))
    assert decision.accepted and decision.score == 0 and decision.reasons == []


def test_the_minimum_score_is_inclusive(rules: SelectionRules) -> None:
    low = decide(rules, candidate(**{**BARE, "ProtocolName": "t1", "PixelSpacing": [1.0, 1.0]}))
    assert not low.accepted and low.score == 1.5
    assert low.reasons == ["+1 T1 protocol in ProtocolName", "+0.5 about 1 mm in-plane",
                           "rejected: score 1.5 below minimum 2"]
    exact = decide(rules, candidate(**{**BARE, "SeriesDescription": "t1 3d"}))
    assert exact.accepted and exact.score == 2.0


def test_the_highest_score_wins_then_more_images_then_the_rescan_then_the_uid(rules: SelectionRules) -> None:
    best = candidate("1.2.3.1", slices=100)
    weaker = candidate("1.2.3.9", slices=200, SeriesNumber=9, PixelSpacing=[2.0, 2.0])
    chosen, decisions = winner(rules, [weaker, best])
    assert chosen == "1.2.3.1"
    assert decisions[0].reasons[-1] == "not chosen: series 1.2.3.1 ranks higher"
    assert [d.accepted for d in decisions] == [False, True]
    assert winner(rules, [candidate("1.2.3.1", slices=160), candidate("1.2.3.9", slices=150, SeriesNumber=9)])[0] \
        == "1.2.3.1"
    assert winner(rules, [candidate("1.2.3.9", SeriesNumber=4), candidate("1.2.3.1", SeriesNumber=5)])[0] \
        == "1.2.3.1"
    assert winner(rules, [candidate("1.2.3.1"), candidate("1.2.3.2")])[0] == "1.2.3.2"
    unnumbered = candidate("1.2.3.8", SeriesNumber=None)
    assert winner(rules, [unnumbered, candidate("1.2.3.1", SeriesNumber=0)])[0] == "1.2.3.1"


def test_rejected_candidates_keep_their_reasons_next_to_thewinner(rules: SelectionRules) -> None:
    chosen, decisions = winner(rules, [candidate("1.2.3.5", MRAcquisitionType="2D"), candidate("1.2.3.6")])
    assert chosen == "1.2.3.6"
    assert decisions[0].reasons == ["rejected: 3D acquisition"] and decisions[0].score == 0
    assert decisions[1].reasons == ALL_SCORES


@pytest.mark.parametrize(("text", "message"), [
    ('[[require]]\nequals = ["MR"]\n', r"require\[0\]: 'attribute' is required"),
    ('[[require]]\nattribute = "Modality"\n', r"require\[0\]: needs at least one of"),
    ('[[require]]\nattribute = "EchoTime"\nrange = [1]\n', r"require\[0\]\.range: expected \[low, high\]"),
    ('[[require]]\nattribute = "EchoTime"\nrange = ["a", "b"]\n', r"require\[0\]\.range"),
    ('[[score]]\nattribute = "Modality"\nequals = "MR"\nscore = "high"\n', r"score\[0\]\.score: expected a number"),
    ('[[score]]\nattribute = "Modality"\nequals = [1]\n', r"'score\[0\]\.equals': expected a string"),
    ('[[score]]\nattribute = 3\nequals = "MR"\n', r"score\[0\]\.attribute"),
    ('[selection]\nmin_score = "two"\n[[score]]\nattribute = "Modality"\nequals = "MR"\n',
     r"selection\.min_score: expected a number"),
    ('[selection]\nmin_score = 1\n', "no \\[\\[require\\]\\] or \\[\\[score\\]\\] rules"),
    ('require = [1]\n', r"require\[0\]: expected a table"),
    ('[[require]]\nattribute = "SeriesDescription"\nnot_regex = "(x"\n', r"require\[0\]\.regex"),
    ("not toml [", "series selection rules"),
])
def test_malformed_rules_are_refused_naming_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_rules(path)


def test_custom_rules_tests_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[require]]\nattribute = "ImageType"\ninclude_any = ["m", "P"]\nnot_equals = ["derived"]\n'
        '[[require]]\nname = "named"\nattribute = ["Missing", "SeriesDescription"]\nregex = "^T1"\n'
        '[[score]]\nattribute = "PixelSpacing"\nequals = "0.9"\nscore = 3\n')
    rules = load_rules(path)
    assert rules.min_score == 0.0
    assert [r.name for r in rules.requirements] == ["ImageType", "named"]
    assert rules.requirements[1].attributes == ("Missing", "SeriesDescription")
    assert rules.scores[0].score == 3.0 and not rules.requirements[0].missing_ok
    spacing = candidate(PixelSpacing=[0.9, 1.1])
    assert decide(rules, spacing).score == 3.0                      # any value of a multi-valued attribute
    assert decide(rules, candidate(ImageType=["ORIGINAL", "DERIVED", "M"])).reasons == ["rejected: ImageType"]
    assert decide(rules, candidate(ImageType=["ORIGINAL", "PRIMARY"])).reasons == ["rejected: ImageType"]
    assert decide(rules, candidate(SeriesDescription="mprage t1")).reasons == ["rejected: named"]
    assert decide(rules, candidate(SeriesDescription=None)).reasons == ["rejected: named"]


def test_sop_class_is_matched_by_uid_or_by_name(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(f'[[require]]\nattribute = "SOPClassUID"\nequals = ["{MRImageStorage}"]\n'
                    '[[require]]\nattribute = "SOPClassUID"\nequals = ["mr image storage"]\n')
    rules = load_rules(path)
    assert decide(rules, candidate()).accepted
    assert decide(rules, candidate(SOPClassUID=EnhancedMRImageStorage)).reasons == [
        "rejected: SOPClassUID", "rejected: SOPClassUID"]
