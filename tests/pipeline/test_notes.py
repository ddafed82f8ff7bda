"""Clinical notes: parsing (CSV, JSON lines), choosing and joining."""

from __future__ import annotations

import json
from datetime import date

import pytest

from core.errors import NodeError
from pipeline.notes import ClinicalNote, choose_notes, format_note_text, parse_notes_file

CSV = """note_id,patient_id,issuer_of_patient_id,accession_number,note_date,note_type,text
n1,P1,HOSP,,2024-01-02,memory clinic,"Reports word-finding
difficulty, family concerned."
n2,P1,HOSP,ACC9,2023-12-20,neurology,Gait normal.
n3,P2,HOSP,,2024-01-03,neurology,Other patient.
n4,P1,OTHER,,2024-01-04,neurology,Same ID from another issuer.
n5,P1,,,20230101,gp,Too old.
n6,P1,HOSP,,2024-02-01,gp,After the study.
"""


def _note(note_id: str, when: date, accession: str | None = None, issuer: str | None = "HOSP") -> ClinicalNote:
    return ClinicalNote(note_id=note_id, patient_id="P1", issuer_of_patient_id=issuer,
                        accession_number=accession, note_date=when, note_type="neurology", text=f"text {note_id}")


def test_parse_csv_with_multiline_text(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text(CSV, encoding="utf-8")
    notes = parse_notes_file(path)
    assert [n.note_id for n in notes] == ["n1", "n2", "n3", "n4", "n5", "n6"]
    assert notes[0].text.startswith("Reports word-finding\ndifficulty")
    assert notes[1].accession_number == "ACC9" and notes[0].accession_number is None
    assert notes[4].note_date == date(2023, 1, 1) and notes[4].issuer_of_patient_id is None


def test_parse_jsonl(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"patient_id": "P1", "note_date": "2024-01-02", "note_type": "memory clinic", "text": "MMSE 27/30."},
            {"patient_id": 42, "note_date": "2024-01-01", "note_type": "gp", "text": "Hypertension.",
             "accession_number": "A1"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    notes = parse_notes_file(path)
    assert len(notes) == 2 and notes[1].patient_id == "42" and notes[1].note_id is None


@pytest.mark.parametrize(("name", "content", "message"), [
    ("bad.csv", "patient_id,note_date,note_type,text\nP1,2024-01-01,gp,ok\nP1,01/02/2024,gp,bad date\n",
     r"bad\.csv line 3: note_date is not YYYY-MM-DD"),
    ("bad.csv", "patient_id,note_date,note_type,text\nP1,2024-01-01,gp,\n",
     r"bad\.csv line 2: missing text"),
    ("bad.csv", "patient_id,note_date,text\nP1,2024-01-01,x\n", r"line 1: header lacks column\(s\) note_type"),
    ("bad.csv", "patient_id,note_date,note_type,text\nP1,2024-01-01,gp,a,extra\n",
     r"line 2: more cells than header columns"),
    ("bad.jsonl", '{"patient_id": "P1", "note_date": "2024-01-01", "note_type": "gp", "text": "a"}\n{oops\n',
     r"bad\.jsonl line 2: not valid JSON"),
    ("bad.jsonl", '\n["list"]\n', r"bad\.jsonl line 2: expected a JSON object"),
])
def test_bad_rows_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(NodeError, match=message):
        parse_notes_file(path)


def test_bad_row_message_has_no_patient_data(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("patient_id,note_date,note_type,text\nSECRET-ID,never,gp,private words\n", encoding="utf-8")
    with pytest.raises(NodeError) as info:
        parse_notes_file(path)
    assert "SECRET-ID" not in str(info.value) and "private" not in str(info.value)


def test_choose_notes_window_patient_issuer_and_order(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text(CSV, encoding="utf-8")
    notes = parse_notes_file(path)
    chosen = choose_notes(notes, patient_id="P1", issuer="HOSP", study_date=date(2024, 1, 10),
                          accession_number="ACC9", window_days=90)
    assert [n.note_id for n in chosen] == ["n2", "n1"]  # accession match first, then newest
    no_accession = choose_notes(notes, patient_id="P1", issuer=None, study_date=date(2024, 1, 10),
                                accession_number=None, window_days=90)
    assert [n.note_id for n in no_accession] == ["n4", "n1", "n2"]


def test_choose_notes_boundaries():
    study = date(2024, 3, 1)
    notes = [_note("on-day", study), _note("edge", date(2024, 2, 1)), _note("out", date(2024, 1, 31)),
             _note("no-issuer", date(2024, 2, 15), issuer=None)]
    chosen = choose_notes(notes, patient_id="P1", issuer="HOSP", study_date=study, accession_number="X",
                          window_days=29)
    assert [n.note_id for n in chosen] == ["on-day", "no-issuer", "edge"]
    assert choose_notes(notes, patient_id="P2", issuer=None, study_date=study, accession_number=None,
                        window_days=365) == []


def test_format_note_text():
    notes = [_note("a", date(2024, 1, 2)), _note("b", date(2023, 12, 1))]
    text = format_note_text(notes)
    assert text == "2024-01-02 neurology: text a\n\n2023-12-01 neurology: text b"
    assert format_note_text([]) == ""
