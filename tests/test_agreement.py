"""Bland–Altman agreement of per-night sleep statistics (metrics.bland_altman) against hand-computed values, and
evaluate.py's per-night statistics on the technologist's scored epochs."""
import math

import numpy as np
import pytest

import evaluate as ev
import metrics


def test_bias_and_limits_hand_computed():
    # d = observed − reference = 2, −1, 5, 0: mean 1.5; squared deviations 0.25 + 6.25 + 12.25 + 2.25 = 21,
    # variance 21 / (4 − 1) = 7, SD √7
    a = metrics.bland_altman([10, 20, 30, 40], [12, 19, 35, 40])
    assert a["n"] == 4 and a["bias"] == pytest.approx(1.5) and a["sd"] == pytest.approx(math.sqrt(7))
    assert a["loa"] == pytest.approx([1.5 - 1.96 * math.sqrt(7), 1.5 + 1.96 * math.sqrt(7)])
    assert a["mean_reference"] == pytest.approx(25) and a["mean_observed"] == pytest.approx(26.5)
    # d = 1, 3: bias 2, SD √2; another multiple of the SD
    b = metrics.bland_altman([0, 0], [1, 3], z=2)
    assert b["bias"] == pytest.approx(2) and b["loa"] == pytest.approx([2 - 2 * math.sqrt(2), 2 + 2 * math.sqrt(2)])
    # the sign: observed below the reference is a negative bias
    assert metrics.bland_altman([5, 7, 9], [4, 6, 8])["bias"] == pytest.approx(-1)
    assert metrics.bland_altman([5, 7, 9], [4, 6, 8])["sd"] == pytest.approx(0)


def test_missing_values_leave_their_pair_out():
    # the second pair has no reference (a night without REM: no REM latency), the third no observation
    a = metrics.bland_altman([10, None, 30, 40], [12, 5, float("nan"), 41])
    assert a["n"] == 2 and a["bias"] == pytest.approx(1.5) and a["sd"] == pytest.approx(math.sqrt(0.5))
    assert a["mean_reference"] == pytest.approx(25) and a["mean_observed"] == pytest.approx(26.5)
    one = metrics.bland_altman([3, None], [4, 1])
    assert one["n"] == 1 and one["bias"] == 1 and np.isnan(one["sd"]) and np.isnan(one["loa"]).all()
    none = metrics.bland_altman([None], [None])
    assert none["n"] == 0 and np.isnan(none["bias"]) and np.isnan(none["mean_reference"])
    assert ev.to_json(none)["bias"] is None                          # null in results.json


def test_night_statistics_are_computed_on_the_technologists_epochs():
    stages = np.array([0, -1, 2, 2, 4, 0, -1])                       # W, unscored, N2, N2, R, W, unscored
    pred = np.array([0, 2, 2, 3, 4, 4, 2])                           # the model stages every epoch
    probs = np.eye(5, dtype=np.float32)[pred]                        # [E, 5] one-hot
    true, predicted = ev.night_statistics(stages, probs)
    assert set(true) == set(ev.AGREEMENT_STATS) == set(predicted)
    assert true["TST_min"] == 1.5 and predicted["TST_min"] == 2.0   # epochs 1 and 6 are not the model's to count
    assert true["N2_min"] == 1.0 and predicted["N2_min"] == 0.5 and predicted["N3_min"] == 0.5
    assert true["SE_pct"] == pytest.approx(100 * 1.5 / 3.5) and predicted["SE_pct"] == pytest.approx(100 * 2 / 3.5)
    assert true["WASO_min"] == 0 and predicted["WASO_min"] == 0
    assert true["SOL_min"] == predicted["SOL_min"] == 1.0
    assert true["REM_latency_from_onset_min"] == 1.0 and predicted["REM_latency_from_onset_min"] == 1.0
    assert true["W_min"] == 1.0 and predicted["W_min"] == 0.5
