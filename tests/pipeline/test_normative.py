"""Tests of pipeline.normative: loading a normative volume table and z-scores against it."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import ConfigError, NodeError
from pipeline.normative import NormativeTable, NormativeTableError, percentile_of_z
from tests.support.volumes import NORMATIVE_CSV

HEADER = "structure,sex,age_min,age_max,mean_ml,sd_ml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "table.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_table_loads_with_its_source(tmp_path: Path) -> None:
    table = NormativeTable.load(write(tmp_path, NORMATIVE_CSV))

    assert table.source == "Test cohort (synthetic), measured with pipeline.volumetry 1"
    assert [(r.structure, r.sex, r.age_min, r.age_max) for r in table.rows] == [
        ("hippocampus_left", "F", 70.0, 80.0), ("hippocampus_left", "any", 70.0, 80.0),
        ("intracranial", "any", 0.0, 120.0)]


def test_z_score_and_percentile_against_hand_computed_values(tmp_path: Path) -> None:
    table = NormativeTable.load(write(tmp_path, NORMATIVE_CSV))

    assert table.z_score("hippocampus_left", 76.0, "F", 3.2) == pytest.approx((3.2 - 3.8) / 0.4)  # -1.5
    assert table.percentile("hippocampus_left", 76.0, "F", 3.2) == pytest.approx(6.6807, abs=1e-4)  # Phi(-1.5)
    assert table.z_score("hippocampus_left", 76.0, "M", 3.2) == pytest.approx((3.2 - 3.6) / 0.5)  # the "any" row
    assert table.z_score("hippocampus_left", 80.0, "F", 3.2) is None  # 70 <= age < 80
    assert table.z_score("hippocampus_left", 70.0, "F", 3.8) == 0.0
    assert table.z_score("hippocampus_right", 76.0, "F", 3.2) is None  # no row
    assert table.z_score("intracranial", None, "F", 1400.0) is None  # age unknown
    assert percentile_of_z(0.0) == 50.0
    assert percentile_of_z(1.959964) == pytest.approx(97.5, abs=1e-4)


def test_a_table_without_a_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NormativeTableError, match=r"line 1: must be '# source: <where the values come from>'"):
        NormativeTable.load(write(tmp_path, f"{HEADER}\nhippocampus_left,F,70,80,3.8,0.4\n"))
    with pytest.raises(NormativeTableError, match="line 1: the source is empty"):
        NormativeTable.load(write(tmp_path, f"# source:   \n{HEADER}\nhippocampus_left,F,70,80,3.8,0.4\n"))


@pytest.mark.parametrize(("row", "message"), [
    ("hipocampus_left,F,70,80,3.8,0.4", r"line 4: unknown structure 'hipocampus_left' \(expected one of"),
    ("hippocampus_left,X,70,80,3.8,0.4", "line 4: sex 'X' is not M, F or any"),
    ("hippocampus_left,F,70,80,abc,0.4", "line 4: mean_ml 'abc' is not a number"),
    ("hippocampus_left,F,70,80,3.8,nan", "line 4: sd_ml 'nan' is not a finite number"),
    ("hippocampus_left,F,80,70,3.8,0.4", "line 4: the age band 80-70 is empty or negative"),
    ("hippocampus_left,F,70,80,3.8,0", "line 4: mean_ml and sd_ml must be above 0"),
    ("hippocampus_left,F,70,80,3.8", "line 4: 5 fields, expected 6"),
    ("hippocampus_right,F,60,75,3.8,0.4", "line 4: the age band 60-75 of hippocampus_right \\(F\\) overlaps line 3"),
])
def test_a_bad_row_is_refused_naming_its_line(tmp_path: Path, row: str, message: str) -> None:
    text = f"# source: test\n{HEADER}\nhippocampus_right,F,70,80,3.7,0.4\n{row}\n"
    with pytest.raises(NormativeTableError, match=message) as raised:
        NormativeTable.load(write(tmp_path, text))
    assert str(tmp_path / "table.csv") in str(raised.value)
    assert isinstance(raised.value, ConfigError) and isinstance(raised.value, NodeError)


def test_missing_columns_comments_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(NormativeTableError, match="line 2: the columns must be structure,sex,age_min,age_max"):
        NormativeTable.load(write(tmp_path, "# source: test\nstructure,sex,mean_ml,sd_ml\n"))
    with pytest.raises(NormativeTableError, match="no rows after the header"):
        NormativeTable.load(write(tmp_path, f"# source: test\n{HEADER}\n"))
    with pytest.raises(NormativeTableError, match="cannot be read"):
        NormativeTable.load(tmp_path / "missing.csv")
    table = NormativeTable.load(write(tmp_path, f"# source: test\n# a comment\n\n{HEADER}\n"
                                                "# women\nhippocampus_left,f,70,80,3.8,0.4\n"
                                                "white_matter,ANY,0,120,450,50\n"))
    assert [(r.structure, r.sex) for r in table.rows] == [("hippocampus_left", "F"), ("white_matter", "any")]
