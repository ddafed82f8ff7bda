"""Series selection, detail by detail: the rule file's parser, the plane of a series, the ranking.

Each test pins one decision of :mod:`pipeline.select` that the rule-by-rule
tests (``test_select_rules.py``) leave open; most were written against a
mutant that survived them (docs/mutation.md).  Candidates are header-only
(:mod:`tests.support.selection`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydicom import DataElement, Dataset
from pydicom.tag import Tag
from pydicom.uid import EnhancedMRImageStorage

from core.errors import ConfigError
from pipeline.select import (
    DEFAULT_RULES_PATH,
    NoSuitableSeries,
    SelectionRules,
    SeriesCandidate,
    load_rules,
    select_series,
)
from tests.support.selection import SLICES, candidate, custom_rules, decide, t1_header, winner


@pytest.fixture
def rules() -> SelectionRules:
    return load_rules(DEFAULT_RULES_PATH)


@pytest.mark.parametrize("attribute", ['""', "[]"])
def test_an_empty_attribute_is_refused(tmp_path: Path, attribute: str) -> None:
    with pytest.raises(ConfigError, match=r"^require\[0\]: 'attribute' is required \(a keyword or a list"):
        custom_rules(tmp_path, f'[[require]]\nattribute = {attribute}\nequals = "MR"\n')


@pytest.mark.parametrize("test", ["not_equals", "include_all", "include_any", "exclude_any"])
def test_a_malformed_test_value_is_refused_naming_rule_and_test(tmp_path: Path, test: str) -> None:
    with pytest.raises(ConfigError, match=rf"^series selection rule 'score\[1\]\.{test}': expected a string or a "):
        custom_rules(tmp_path, f'[[score]]\nattribute = "Modality"\nequals = "MR"\n'
                          f'[[score]]\nattribute = "Modality"\n{test} = [2]\n')


def test_rule_defaults_name_score_and_missing(tmp_path: Path) -> None:
    rules = custom_rules(tmp_path, '[[score]]\nattribute = ["ProtocolName", "SeriesDescription"]\nequals = "T1"\n'
                              '[[require]]\nattribute = "Missing"\nequals = "x"\nmissing_ok = true\n')
    assert rules.scores[0].name == "ProtocolName / SeriesDescription"
    assert rules.scores[0].score == 0.0 and rules.min_score == 0.0
    assert rules.requirements[0].missing_ok is True
    decision = decide(rules, candidate(ProtocolName="t1"))
    assert decision.accepted and decision.score == 0.0 and decision.reasons == ["+0 ProtocolName / SeriesDescription"]


def test_missing_ok_decides_an_absent_attribute(tmp_path: Path) -> None:
    for missing_ok, reasons in (("true", []), ("false", ["rejected: Missing"])):
        rules = custom_rules(tmp_path, f'[[require]]\nattribute = "Missing"\nequals = "x"\nmissing_ok = {missing_ok}\n')
        assert decide(rules, candidate()).reasons == reasons


def test_not_regex_and_exclude_any_reject_whatever_the_case(tmp_path: Path) -> None:
    rules = custom_rules(tmp_path, '[[require]]\nattribute = "SeriesDescription"\nnot_regex = "flair"\n'
                              '[[require]]\nattribute = "ImageType"\nexclude_any = ["derived"]\n')
    assert decide(rules, candidate()).accepted
    assert decide(rules, candidate(SeriesDescription="T2 FLAIR")).reasons == ["rejected: SeriesDescription"]
    assert decide(rules, candidate(ImageType=["DERIVED", "PRIMARY"])).reasons == ["rejected: ImageType"]


def test_the_minimum_score_of_a_rule_file_applies(tmp_path: Path) -> None:
    rules = custom_rules(tmp_path, '[selection]\nmin_score = 1.5\n[[score]]\nattribute = "Modality"\nequals = "MR"\n'
                              'score = 1\n')
    assert rules.min_score == 1.5
    assert decide(rules, candidate()).reasons == ["+1 Modality", "rejected: score 1 below minimum 1.5"]


def test_a_non_numeric_minimum_score_is_refused_with_its_own_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^selection\.min_score: expected a number$"):
        custom_rules(tmp_path, '[selection]\nmin_score = "two"\n[[score]]\nattribute = "Modality"\nequals = "MR"\n')


def test_an_empty_top_level_value_is_looked_up_in_the_shared_functional_groups(rules: SelectionRules) -> None:
    group = Dataset()
    item = Dataset()
    item.MRAcquisitionType = "3D"
    group.MRFOVGeometrySequence = [item]
    header = t1_header(MRAcquisitionType="")
    header.SharedFunctionalGroupsSequence = [group]
    assert decide(rules, SeriesCandidate("1.2.3.4", [header] * SLICES)).accepted
    item.MRAcquisitionType = "2D"
    assert decide(rules, SeriesCandidate("1.2.3.4", [header] * SLICES)).reasons == ["rejected: 3D acquisition"]


AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def _tilted(degrees: float) -> list[float]:
    """Axial rows tilted about the x axis: the normal is (0, -sin, cos)."""
    angle = math.radians(degrees)
    return [1.0, 0.0, 0.0, 0.0, math.cos(angle), math.sin(angle)]


def _plane(tmp_path: Path, headers: list[Dataset]) -> str:
    """The plane the selector sees, through a rule that requires each name in turn."""
    names = ["axial", "sagittal", "coronal", "oblique", "mixed"]
    text = "".join(f'[[score]]\nname = "{n}"\nattribute = "@orientation"\nequals = "{n}"\nscore = 1\n' for n in names)
    reasons = decide(custom_rules(tmp_path, text), SeriesCandidate("1.2.3.4", headers)).reasons
    assert len(reasons) == 1, reasons
    return reasons[0].removeprefix("+1 ")


def test_the_plane_of_a_series(tmp_path: Path) -> None:
    assert _plane(tmp_path, [t1_header(ImageOrientationPatient=AXIAL)] * 3) == "axial"
    assert _plane(tmp_path, [t1_header()] * 3) == "sagittal"
    assert _plane(tmp_path, [t1_header(ImageOrientationPatient=_tilted(9.5))] * 3) == "axial"
    assert _plane(tmp_path, [t1_header(ImageOrientationPatient=_tilted(10.5))] * 3) == "oblique"
    # exactly 10 degrees off the axis is oblique: the normal's z is cos(10 degrees) itself
    assert _plane(tmp_path, [t1_header(ImageOrientationPatient=_tilted(10.0))] * 3) == "oblique"


def test_slices_within_the_orientation_tolerance_are_one_orientation(tmp_path: Path) -> None:
    axial = t1_header(ImageOrientationPatient=AXIAL)
    # the normal moves by exactly 0.001 (the tolerance): still one orientation; a little more is mixed
    assert _plane(tmp_path, [axial, t1_header(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, -0.001])]) == "axial"
    assert _plane(tmp_path, [axial, t1_header(ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, -0.0011])]) == "mixed"
    # the odd one out may be the second image
    assert _plane(tmp_path, [axial, t1_header(), axial, axial]) == "mixed"


def test_the_refusal_says_how_many_series_were_considered(rules: SelectionRules) -> None:
    with pytest.raises(NoSuitableSeries, match=r"^no suitable 3D T1 series \(2 series considered\)$") as caught:
        select_series([candidate("1.2.3.1", Modality="CT"), candidate("1.2.3.2", slices=10)], rules)
    assert caught.value.reason == "no suitable 3D T1 series (2 series considered)"


def test_an_empty_or_zero_frame_count_counts_one_image(rules: SelectionRules) -> None:
    for frames in (0, ""):
        assert decide(rules, candidate(slices=99, NumberOfFrames=frames)).reasons == ["rejected: at least 100 slices"]
        assert decide(rules, candidate(slices=100, NumberOfFrames=frames)).accepted


def _enhanced(orientation: list[float]) -> Dataset:
    """An Enhanced MR header whose orientation lives only in the shared functional groups."""
    plane = Dataset()
    plane.ImageOrientationPatient = orientation
    group = Dataset()
    group.PlaneOrientationSequence = [plane]
    header = t1_header(ImageOrientationPatient=None, SOPClassUID=EnhancedMRImageStorage, NumberOfFrames=SLICES)
    header.SharedFunctionalGroupsSequence = [group]
    return header


def test_the_orientation_of_an_enhanced_instance_is_read_from_its_shared_groups(tmp_path: Path) -> None:
    assert _plane(tmp_path, [_enhanced(AXIAL)]) == "axial"
    assert _plane(tmp_path, [_enhanced(AXIAL), _enhanced([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])]) == "mixed"
    no_plane = _enhanced(AXIAL)
    del no_plane.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    # no orientation anywhere: no plane, which the shipped rules refuse
    assert decide(load_rules(DEFAULT_RULES_PATH), SeriesCandidate("1.2.3.4", [no_plane])).reasons == [
        "rejected: one slice orientation"]


def test_shared_groups_are_searched_past_other_elements_and_empty_values(rules: SelectionRules) -> None:
    empty, full = Dataset(), Dataset()
    empty.MRAcquisitionType = ""
    full.MRAcquisitionType = "3D"
    group = Dataset()
    group.ImageType = ["ORIGINAL"]                 # (0008,0008): not a sequence, before the sequences
    group.MRImagingModifierSequence = [Dataset()]  # (0018,9006): no such attribute in it
    group.MRTimingAndRelatedParametersSequence = [empty]  # (0018,9112): present but empty
    group.MRFOVGeometrySequence = [full]           # (0018,9125): the value
    header = t1_header(MRAcquisitionType=None)
    header.SharedFunctionalGroupsSequence = [group]
    assert decide(rules, SeriesCandidate("1.2.3.4", [header] * SLICES)).accepted


def test_an_unnamed_uid_is_one_value(tmp_path: Path) -> None:
    rules = custom_rules(tmp_path, '[[require]]\nattribute = "SOPClassUID"\nregex = "^1\\\\.2\\\\.3\\\\.4$"\n')
    assert decide(rules, candidate(SOPClassUID="1.2.3.4")).accepted
    assert decide(rules, candidate()).reasons == ["rejected: SOPClassUID"]


def test_an_unknown_key_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^score\[0\]: unknown key\(s\) \['equal', 'scor'\]$"):
        custom_rules(tmp_path, '[[score]]\nattribute = "Modality"\nequals = "MR"\nequal = "MR"\nscor = 1\n')


def test_a_regex_sees_the_values_joined_by_backslashes(tmp_path: Path) -> None:
    # in TOML "\\\\" is one escaped backslash of the regex: it matches the separator itself
    rules = custom_rules(tmp_path, '[[require]]\nattribute = "ImageType"\n'
                                   'regex = "^original\\\\\\\\primary\\\\\\\\m$"\n')
    assert decide(rules, candidate(ImageType=["ORIGINAL", "PRIMARY", "M"])).accepted
    assert not decide(rules, candidate(ImageType=["ORIGINAL", "PRIMARY", "M", "ND"])).accepted


def test_absent_description_and_modality_are_reported_empty(rules: SelectionRules) -> None:
    decision = decide(rules, candidate("1.2.3.7", SeriesDescription=None, Modality=None))
    assert (decision.series_instance_uid, decision.description, decision.modality) == ("1.2.3.7", "", "")


def test_the_score_outranks_the_wording_of_the_reasons(tmp_path: Path) -> None:
    rules = custom_rules(tmp_path, '[[score]]\nname = "x"\nattribute = "ProtocolName"\nequals = "ten"\nscore = 10\n'
                              '[[score]]\nname = "y"\nattribute = "ProtocolName"\nequals = "nine"\nscore = 9\n')
    chosen, decisions = winner(rules, [candidate("1.2.3.2", ProtocolName="nine"),
                                        candidate("1.2.3.1", ProtocolName="ten")])
    assert chosen == "1.2.3.1"
    assert [(d.series_instance_uid, d.score, d.accepted) for d in decisions] == [("1.2.3.2", 9.0, False),
                                                                                 ("1.2.3.1", 10.0, True)]


def _unreadable_number(uid: str) -> SeriesCandidate:
    header = t1_header(SeriesNumber=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Invalid value for VR", UserWarning)
        header.add(DataElement(Tag("SeriesNumber"), "LO", "abc"))
    return SeriesCandidate(uid, [header] * SLICES)


def test_an_unreadable_series_number_ranks_as_no_number(rules: SelectionRules) -> None:
    # equal in everything but the number, which neither has: the UID decides, whichever comes first
    unnumbered = candidate("1.2.3.2", SeriesNumber=None)
    assert winner(rules, [_unreadable_number("1.2.3.1"), unnumbered])[0] == "1.2.3.2"
    unnumbered = candidate("1.2.3.1", SeriesNumber=None)
    assert winner(rules, [_unreadable_number("1.2.3.2"), unnumbered])[0] == "1.2.3.2"
    assert winner(rules, [_unreadable_number("1.2.3.2"), candidate("1.2.3.1", SeriesNumber=0)])[0] == "1.2.3.1"


def test_a_rule_file_is_read_as_utf8_whatever_the_locale(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[require]]\nname = "Schädel T1"\nattribute = "Modality"\nequals = "MR"\n', encoding="utf-8")
    assert load_rules(path).requirements[0].name == "Schädel T1"
    code = ("import sys; from pipeline.select import load_rules; "
            "print(load_rules(sys.argv[1]).requirements[0].name.encode('unicode_escape').decode())")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}  # an ASCII locale
    done = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Sch\\xe4del T1"
