"""The verdict rule on known differences: seeds are the replicated unit, the margin decides non-inferiority,
a floor or ceiling measures nothing."""

import numpy as np
import pytest
from scipy import stats

from flywheel.policy.statistics import compare_metric


def arms(shift: float, seed_noise: float, seeds: int = 3, episodes: int = 50, rng_seed: int = 0):
    """[seeds, episodes] coverage of a real arm and a refreshed arm `shift` higher; each training run (row)
    has its own offset of size `seed_noise`, shared by both arms' runs of that seed only partly."""
    rng = np.random.default_rng(rng_seed)
    start = rng.uniform(0.1, 0.6, episodes)                      # how hard each start is, same in both arms
    run = rng.normal(0, seed_noise, (2, seeds, 1))               # training-seed effect per arm and seed
    real = np.clip(start + run[0] + rng.normal(0, 0.05, (seeds, episodes)), 0, 1)
    refreshed = np.clip(start + shift + run[1] + rng.normal(0, 0.05, (seeds, episodes)), 0, 1)
    return real, refreshed


@pytest.mark.parametrize("shift, noise, expected", [
    (0.20, 0.01, "better"),
    (0.00, 0.005, "non-inferior"),
    (-0.20, 0.01, "worse"),
    (0.00, 0.15, "inconclusive"),
])
def test_verdicts(shift, noise, expected):
    real, refreshed = arms(shift, noise)
    result = compare_metric("coverage", real, refreshed, margin=0.05, confidence=0.95)
    assert result.verdict == expected, result.reason
    # The interval is the paired t interval over the per-seed means (scipy's own).
    ci = stats.ttest_rel(refreshed.mean(1), real.mean(1)).confidence_interval(0.95)
    assert (result.difference.low, result.difference.high) == pytest.approx((ci.low, ci.high))
    assert result.real.low <= result.real.mean <= result.real.high


@pytest.mark.parametrize("spread, expected", [(0.002, "better"), (0.06, "inconclusive")])
def test_a_small_gain_shows_only_through_small_training_noise(spread, expected):
    """+0.05 on every start; the three refreshed runs land `spread` above, at and below that: a consistent gain
    is 'better', one as uncertain as itself is not (the t interval over 3 seeds has 2 degrees of freedom)."""
    start = np.linspace(0.1, 0.6, 50)
    real = np.tile(start, (3, 1))
    refreshed = real + 0.05 + np.array([[spread], [-spread], [0.0]])
    assert compare_metric("coverage", real, refreshed, margin=0.05, confidence=0.95).verdict == expected


def test_no_success_anywhere_is_inconclusive_not_non_inferior():
    zeros = np.zeros((3, 50))
    result = compare_metric("success", zeros, zeros, margin=0.05, confidence=0.95)
    assert result.verdict == "inconclusive" and "floor or ceiling" in result.reason
    assert result.real.pooled_low == 0.0 and 0 < result.real.pooled_high < 0.05, "Wilson interval of 0/150"


def test_one_seed_gives_no_verdict_and_shapes_must_match():
    real, refreshed = arms(0.2, 0.01, seeds=1)
    assert compare_metric("coverage", real, refreshed, 0.05, 0.95).verdict == "inconclusive"
    with pytest.raises(ValueError, match="same"):
        compare_metric("coverage", real, np.vstack([refreshed, refreshed]), 0.05, 0.95)


def test_success_intervals_stay_in_the_unit_interval():
    real = np.zeros((3, 50))
    real[0, :2] = 1
    result = compare_metric("success", real, real, 0.05, 0.95)
    assert result.real.low == 0.0 and result.real.high <= 1.0 and result.real.mean == pytest.approx(2 / 150)


def test_arms_that_do_no_better_than_doing_nothing_measure_nothing():
    """Coverage 0.02 vs 0.03 looks non-inferior (within the margin), but an idle agent scores 0.05 on the same
    starts: the policies learned nothing, so the verdict is inconclusive. Above the baseline the rule applies."""
    start = np.linspace(0.0, 0.06, 50)
    real = np.tile(start, (3, 1)) - np.array([[0.001], [0.0], [0.002]])
    refreshed = np.tile(start, (3, 1)) + np.array([[0.001], [0.0], [0.002]])
    assert compare_metric("coverage", real, refreshed, 0.05, 0.95).verdict == "non-inferior"
    floored = compare_metric("coverage", real, refreshed, 0.05, 0.95, baseline=0.05)
    assert floored.verdict == "inconclusive" and "neither arm beats doing nothing" in floored.reason
    assert compare_metric("coverage", real + 0.2, refreshed + 0.2, 0.05, 0.95, baseline=0.05).verdict == "non-inferior"


def test_lower_is_better_metrics_are_judged_by_their_decrease():
    real = np.tile(np.linspace(100, 200, 50), (3, 1))
    faster = real - 30 + np.array([[1.0], [-1.0], [0.0]])
    assert compare_metric("steps", real, faster, 5.0, 0.95, higher_is_better=False).verdict == "better"
    assert compare_metric("steps", faster, real, 5.0, 0.95, higher_is_better=False).verdict == "worse"
    assert compare_metric("steps", real, faster, 5.0, 0.95).verdict == "worse", "the same numbers, read the other way"
