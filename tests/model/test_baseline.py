"""Tests of the baseline (model.baseline): image features, the note parser, learning and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.baseline import (
    FEATURE_SETS,
    IMAGE_FEATURES,
    NOTE_FEATURES,
    format_baseline,
    image_features,
    parse_note,
    run_baseline,
)
from model.cohort import CohortConfig, generate_cohort
from model.dataset import Sample, read_manifest, subject_split
from model.types import CLASSES

#: A 32^3 volume whose brain is the box [4, 28)^3 (24^3 = 13,824 voxels).
EDGE, LO, HI = 32, 4, 28
N_BRAIN = 24 ** 3
WM, GM, CSF = 0.9, 0.6, 0.2

# With the brain's bounding box 4..27 (extent 24), the fractions of model.baseline give, by hand:
# central box D [4 + floor(0.40 * 24), 4 + ceil(0.72 * 24)) = [13, 22), H [11, 19), W [11, 21): 9 * 8 * 10 voxels;
# medial temporal boxes D [8, 15), H [12, 19), W [8, 14) and [18, 24): 2 * 7 * 7 * 6 voxels.
N_CENTRAL = 9 * 8 * 10
N_MTL = 2 * 7 * 7 * 6


def known_volume() -> tuple[np.ndarray, dict[str, float]]:
    """A brain of white matter with a CSF block inside the central box, another outside it, and grey matter."""
    vol = np.zeros((EDGE,) * 3, dtype=np.float32)
    vol[LO:HI, LO:HI, LO:HI] = WM
    vol[5:27, 5:27, 5:8] = GM                       # a grey slab along one side (22 * 22 * 3), not in any box
    vol[15:21, 12:18, 13:19] = CSF                  # 6^3 = 216 CSF voxels, inside the central box only
    vol[24:27, 22:26, 22:26] = CSF                  # 3 * 4 * 4 = 48 CSF voxels, outside every box
    n_gm = 22 * 22 * 3
    n_csf = 216 + 48
    expected = {
        "csf_fraction": n_csf / N_BRAIN,
        "central_csf_fraction": 216 / N_CENTRAL,
        # normalised by the 90th percentile of the brain (white matter, 0.9): CSF 0.2 / 0.9, WM 1
        "central_mean_intensity": (216 * CSF / WM + (N_CENTRAL - 216) * 1.0) / N_CENTRAL,
        "white_matter_fraction": (N_BRAIN - n_gm - n_csf) / N_BRAIN,
        "mtl_mean_intensity": 1.0,
        "mtl_csf_fraction": 0.0,
        "intracranial_fraction": N_BRAIN / EDGE ** 3,
    }
    return vol, expected


def test_image_features_of_a_volume_with_known_fractions() -> None:
    vol, expected = known_volume()
    got = dict(zip(IMAGE_FEATURES, image_features(vol), strict=True))
    assert got == pytest.approx(expected, rel=1e-6)


def test_image_features_ignore_gain_and_follow_the_brain() -> None:
    vol, expected = known_volume()
    darker = image_features(vol * 0.5)                         # a global gain: normalised away
    shifted = image_features(np.roll(vol, (2, -1, 1), axis=(0, 1, 2)))  # the boxes follow the brain's box
    want = [expected[k] for k in IMAGE_FEATURES]
    assert darker == pytest.approx(want, rel=1e-6)
    assert shifted == pytest.approx(want, rel=1e-6)


def test_image_features_see_darker_medial_temporal_boxes() -> None:
    vol, _ = known_volume()
    vol[8:15, 12:19, 8:14] = CSF                              # one medial temporal box all CSF
    got = dict(zip(IMAGE_FEATURES, image_features(vol), strict=True))
    assert got["mtl_csf_fraction"] == pytest.approx(0.5)
    assert got["mtl_mean_intensity"] == pytest.approx((CSF / WM + 1.0) / 2)


def test_an_empty_volume_has_no_features() -> None:
    assert np.isnan(image_features(np.zeros((16, 16, 16), dtype=np.float32))).all()


@pytest.mark.parametrize(("note", "expected"), [
    ("78-year-old man, 13 years of education. Frequent memory complaints, reported by a daughter. "
     "MMSE 24/30, CDR-SB 3.0.", {"age": 78, "education_years": 13, "mmse": 24, "cdr_sb": 3.0,
                                 "memory_complaints": 2}),
    ("Patient: 79-year-old man with 17 years of schooling. History: occasional memory complaints (reported by "
     "a son). Cognitive testing: MMSE 29/30; CDR sum of boxes 4.5.",
     {"age": 79, "education_years": 17, "mmse": 29, "cdr_sb": 4.5, "memory_complaints": 1}),
    ("Age 77, woman. Education 13 years. No memory complaints, reported by the patient. MMSE score 28 of 30. "
     "CDR-SB 0.0.", {"age": 77, "education_years": 13, "mmse": 28, "cdr_sb": 0.0, "memory_complaints": 0}),
    ("Seen aged 81. Mini-Mental State Examination: 22. Global CDR 1.",
     {"age": 81, "education_years": math.nan, "mmse": 22, "cdr_sb": math.nan, "memory_complaints": math.nan}),
    ("MMSE 45 (transcription error); CDR-SB 2.5; 66 yo.",
     {"age": 66, "education_years": math.nan, "mmse": math.nan, "cdr_sb": 2.5, "memory_complaints": math.nan}),
    ("", dict.fromkeys(NOTE_FEATURES, math.nan)),
])
def test_note_parser_reads_the_numbers(note: str, expected: dict[str, float]) -> None:
    got = parse_note(note)
    assert list(got) == list(NOTE_FEATURES)
    for key, value in expected.items():
        assert (math.isnan(got[key]) if math.isnan(value) else got[key] == value), (key, got[key])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Sample], list[Sample]]:
    manifest = generate_cohort(tmp_path_factory.mktemp("cohort"), CohortConfig(n_subjects=120, size=64, seed=3))
    samples = read_manifest(manifest)
    train, test = subject_split(samples, 0.3, 0)
    return [samples[i] for i in train], [samples[i] for i in test]


def test_baseline_learns_above_chance_and_is_deterministic(cohort: tuple[list[Sample], list[Sample]]) -> None:
    train, test = cohort
    first = run_baseline(train, test, n_boot=200, seed=0)
    again = run_baseline(train, test, n_boot=200, seed=0)
    assert first == again
    assert first["train_scans"] == len(train) and first["evaluated_scans"] == len(test)
    assert set(first["results"]) == set(FEATURE_SETS)
    macro = {name: r["intervals"]["macro f1"] for name, r in first["results"].items()}
    # chance (random guessing in the class proportions) is a macro F1 of about 0.33: every baseline clears it
    # by at least 0.2, and the combination is not worse than either part by more than noise
    for name, m in macro.items():
        assert m["value"] >= 0.53, (name, m)
        assert m["low"] <= m["value"] <= m["high"] and m["replicates"] == 200
    assert macro["both"]["value"] >= max(macro["MRI features"]["value"], macro["note numbers"]["value"]) - 0.05
    table = format_baseline([(["run a", "run b"], first)])
    assert "| both | run a, run b | " + f"{len(train)} / {len(test)} |" in table


def test_baseline_is_skipped_with_a_reason_when_a_class_is_too_small(
        cohort: tuple[list[Sample], list[Sample]]) -> None:
    train, test = cohort
    ad = CLASSES.index("AD")
    few = [s for s in train if s.label != ad] + [s for s in train if s.label == ad][:1]
    result = run_baseline(few, test, n_boot=10)
    assert result["skipped"].startswith("the training split has too few scans per class (AD 1,")
    assert format_baseline([(["x"], result)]) == f"baseline skipped for x: {result['skipped']}"


def test_notes_without_numbers_are_imputed_not_refused(
                                                       cohort: tuple[list[Sample], list[Sample]]) -> None:
    train, test = cohort
    blank = [Sample(s.subject_id, s.volume, "", s.label) for s in test]
    result = run_baseline(train, blank, n_boot=10)
    macro = result["results"]["note numbers"]["intervals"]["macro f1"]["value"]
    # every blank note gets the training medians: one prediction for all, so at most one class is ever right
    assert macro <= 1 / 3 + 1e-9
