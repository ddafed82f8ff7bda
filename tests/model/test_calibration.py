"""Bootstrap intervals (model.intervals), calibration and temperature scaling (model.calibration)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from model.calibration import (
    apply_temperature,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
)
from model.intervals import bootstrap_intervals, point_metrics


def _labelled(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, 3))
    probs = apply_temperature(logits, temperature)
    labels = np.array([rng.choice(3, p=p) for p in probs])
    return logits, labels


def test_temperature_recovers_the_true_one() -> None:
    logits, labels = _labelled(4000, 2.0, seed=0)  # labels drawn from softmax(logits / 2)
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(logits[:1], labels[:1]) == 1.0


def test_temperature_scaling_lowers_the_calibration_error() -> None:
    logits, labels = _labelled(4000, 2.5, seed=1)
    fit, test = slice(0, 2000), slice(2000, 4000)
    t = fit_temperature(logits[fit], labels[fit])
    raw = expected_calibration_error(apply_temperature(logits[test], 1.0), labels[test])
    calibrated = expected_calibration_error(apply_temperature(logits[test], t), labels[test])
    assert raw > 0.1 and calibrated < raw / 2
    assert (apply_temperature(logits, t).argmax(1) == logits.argmax(1)).all()  # never changes the class


def test_ece_matches_a_hand_computed_value() -> None:
    probs = np.array([[0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.55, 0.45, 0.0], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 0, 2])
    # bins: (0.9, 1.0]: 2 scans, confidence 0.95, accuracy 0.5; (0.5, 0.6]: 2 scans (0.55, 0.6), accuracy 1
    assert expected_calibration_error(probs, labels) == pytest.approx((2 * 0.45 + 2 * (1 - 0.575)) / 4)
    assert sum(b["count"] for b in calibration_bins(probs, labels)) == 4


def test_point_metrics_agree_with_sklearn() -> None:
    logits, labels = _labelled(300, 1.0, seed=2)
    probs = apply_temperature(logits, 1.0)
    m = point_metrics(labels, probs)
    f1 = f1_score(labels, probs.argmax(1), average=None, labels=[0, 1, 2])
    assert [m["f1 AD"], m["f1 MCI"], m["f1 CN"]] == pytest.approx(list(f1))
    assert m["auc MCI"] == pytest.approx(roc_auc_score(labels == 1, probs[:, 1]))
    assert m["macro auc"] == pytest.approx(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in range(3)]))


def test_intervals_resample_subjects_not_scans() -> None:
    logits, labels = _labelled(120, 1.0, seed=3)
    probs = apply_temperature(logits, 1.0)
    subjects = [f"S{i}" for i in range(120)]
    once = bootstrap_intervals(labels, probs, subjects, n_boot=300, seed=4)
    # every scan four times, as four visits of the same subject: no new information, same intervals
    four = bootstrap_intervals(np.repeat(labels, 4), np.repeat(probs, 4, axis=0), list(np.repeat(subjects, 4)),
                               n_boot=300, seed=4)
    for key in ("macro f1", "auc AD", "macro auc"):
        assert four[key]["low"] == pytest.approx(once[key]["low"])
        assert four[key]["high"] == pytest.approx(once[key]["high"])
        assert once[key]["low"] <= once[key]["value"] <= once[key]["high"]
    # treated as 480 independent scans the interval would be about half as wide
    naive = bootstrap_intervals(np.repeat(labels, 4), np.repeat(probs, 4, axis=0), [f"x{i}" for i in range(480)],
                                n_boot=300, seed=4)
    width = once["macro f1"]["high"] - once["macro f1"]["low"]
    assert naive["macro f1"]["high"] - naive["macro f1"]["low"] < 0.7 * width
