"""The INT8 gate's arithmetic, against figures computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from face_emotions.modeling.int8 import GateReport
from face_emotions.modeling.int8 import Int8Gate
from face_emotions.modeling.int8 import judge

# 10 test images: 2 per class, in class order.
Y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])


def test_identical_predictions_pass_with_zero_drops() -> None:
    fp32 = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 1])
    report = judge(Y, fp32, fp32.copy(), Int8Gate(), calibration_images=8)
    assert report.passed and report.failures == []
    assert report.accuracy_fp32 == report.accuracy_int8 == 0.9
    assert report.agreement == 1.0 and set(report.recall_drops.values()) == {0.0}
    assert report.calibration_images == 8 and report.test_images == 10


def test_each_limit_is_checked_and_named() -> None:
    fp32 = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])  # accuracy 1.0
    int8 = np.array([0, 0, 1, 1, 2, 2, 3, 0, 4, 4])  # one Sad image lost
    report = judge(Y, fp32, int8, Int8Gate(), calibration_images=4)
    # By hand: accuracy 1.0 -> 0.9 (10 pt), Sad recall 1.0 -> 0.5 (50 pt), agreement 9/10.
    assert report.accuracy_drop == pytest.approx(0.1)
    assert report.recall_drops == {
        "Angry": 0.0,
        "Fear": 0.0,
        "Happy": 0.0,
        "Sad": 0.5,
        "Surprised": 0.0,
    }
    assert report.agreement == pytest.approx(0.9)
    assert not report.passed
    assert report.failures == [
        "accuracy drops 10.00 pt (at most 0.50)",
        "Sad recall drops 50.00 pt (at most 1.00)",
        "top-1 agreement with fp32 90.00 % (at least 98.00)",
    ]
    # Looser limits let the same figures through.
    loose = Int8Gate(max_accuracy_drop=0.1, max_recall_drop=0.5, min_agreement=0.9)
    assert judge(Y, fp32, int8, loose, calibration_images=4).passed


def test_disagreement_that_costs_no_accuracy_still_fails_on_agreement() -> None:
    fp32 = np.array([0, 1, 1, 1, 2, 2, 3, 3, 4, 4])  # one Angry wrong
    int8 = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 2])  # fixes it, breaks a Surprised one
    report = judge(Y, fp32, int8, Int8Gate(max_recall_drop=1.0), calibration_images=4)
    assert report.accuracy_drop == pytest.approx(0.0)
    assert report.agreement == pytest.approx(0.8)
    assert report.failures == ["top-1 agreement with fp32 80.00 % (at least 98.00)"]


def test_the_report_round_trips_and_summarises() -> None:
    report = judge(Y, Y.copy(), Y.copy(), Int8Gate(), calibration_images=64)
    data = report.to_dict()
    assert data["accuracy_drop"] == 0.0 and data["gate"]["min_agreement"] == 0.98
    assert GateReport.from_dict(data) == report
    assert report.summary().startswith("INT8 gate passed: accuracy 1.0000 -> 1.0000")


def test_an_empty_test_split_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one test image"):
        judge(np.array([]), np.array([]), np.array([]), Int8Gate(), calibration_images=1)
