"""Tests of the synthetic ADNI-like cohort generator (model.cohort, ``dicom-node synth cohort``)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest

from dicom_node.cli.main import main
from model.cohort import CLASS_PROPORTIONS, Anatomy, anatomy, draw_labels

FORBIDDEN = re.compile(r"\b(AD|MCI|CN)\b|alzheimer|dementia|cognitively normal|impairment|diagnos", re.IGNORECASE)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    out = tmp_path_factory.mktemp("cohort")
    assert main(["synth", "cohort", "--out", str(out), "--subjects", "24", "--size", "64", "--seed", "3"]) == 0
    with (out / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = str(out / row["volume"])
    return rows


def test_labels_follow_adni_proportions() -> None:
    labels = draw_labels(100, np.random.default_rng(0))
    assert {c: labels.count(c) for c in CLASS_PROPORTIONS} == {"AD": 28, "CN": 30, "MCI": 42}
    assert len(draw_labels(7, np.random.default_rng(1))) == 7


def test_cohort_has_adni_proportions_and_valid_volumes(cohort: list[dict[str, str]]) -> None:
    subjects = {r["subject_id"]: r["label"] for r in cohort}
    counts = {c: list(subjects.values()).count(c) for c in CLASS_PROPORTIONS}
    assert counts == {"AD": 7, "CN": 7, "MCI": 10}
    volume = np.load(cohort[0]["path"])
    assert volume.shape == (64, 64, 64)
    assert float(volume.min()) >= 0.0 and float(volume.max()) <= 1.0


def test_notes_never_contain_the_diagnosis(cohort: list[dict[str, str]]) -> None:
    for row in cohort:
        assert FORBIDDEN.search(row["note"]) is None, row["note"]
        assert "MMSE" in row["note"] and "years" in row["note"]


@pytest.fixture(scope="module")
def anat() -> Anatomy:
    return anatomy("mni152", 64)


def test_reference_follows_the_tensor_contract_orientation(anat: Anatomy) -> None:
    sites = anat.sites
    assert anat.reference.shape == (64, 64, 64) and float(anat.reference.max()) <= 1.0
    # D grows towards superior, W towards the patient's left
    assert sites["hippocampus_left"][0] < sites["ventricle_left"][0]
    assert sites["ventricle_left"][2] > sites["ventricle_right"][2]


def test_atrophy_is_larger_for_ad_than_cn(cohort: list[dict[str, str]], anat: Anatomy) -> None:
    sites = anat.sites
    near_ventricles = anat.ventricle_distance < 3
    hippocampi = [np.round(sites[k][:3]).astype(int) for k in ("hippocampus_left", "hippocampus_right")]

    def measures(label: str) -> tuple[float, float, float]:
        rows = [r for r in cohort if r["label"] == label]
        vols = [np.load(r["path"]).astype(np.float32) for r in rows]
        csf = float(np.mean([(v[near_ventricles] < 0.3).mean() for v in vols]))
        hippo = float(np.mean([np.mean([v[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 2, c[2] - 1:c[2] + 2].mean()
                                        for c in hippocampi]) for v in vols]))
        return csf, hippo, float(np.mean([float(r["ventricle_scale"]) for r in rows]))

    ad_csf, ad_hippo, ad_scale = measures("AD")
    cn_csf, cn_hippo, cn_scale = measures("CN")
    assert ad_scale > cn_scale
    assert ad_csf > cn_csf + 0.02  # more CSF around the ventricles: enlarged
    assert ad_hippo < cn_hippo  # less tissue signal in the hippocampi: shrunk
