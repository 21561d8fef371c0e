"""Intervals, the paired difference and the verdict (scipy.stats).

The replicated unit is a training run: each arm is trained once per seed and every run is rolled out on the
same start list. For a metric (success in {0, 1}, final coverage, ...) each run gives one mean over its
episodes; run s of the refreshed arm is paired with run s of the real arm (same seed, same starts).

- Per arm: the mean over all episodes, with a Student-t interval over the per-run means (n_seeds - 1 degrees
  of freedom), clipped to [0, 1] for metrics bounded there. For success the pooled Wilson interval over all
  episodes is reported too; it ignores the run-to-run spread, so it is narrower and only descriptive.
- Paired difference refreshed - real: mean of the per-seed differences d_s, with the paired t interval
  (scipy.stats.ttest_rel(...).confidence_interval) and its p-value. The start-level interval (per start,
  the difference averaged over seeds; t over starts) is reported as well; it ignores training noise and is
  not used for the verdict.
- Verdict, with margin m >= 0 on the seed-level interval [lo, hi] (for a metric where lower is better, e.g.
  steps or time, on the interval of real - refreshed instead), first rule that holds:
    inconclusive  fewer than 2 seeds; or the metric takes a single value in every episode of both arms (a floor
                  or ceiling, e.g. no success anywhere); or a do-nothing baseline is known for the metric (the
                  evaluator's `baseline`, e.g. an agent that never moves) and neither arm's mean beats it: the
                  budget did not teach the task, so nothing about the data was measured
    better        lo > 0
    non-inferior  lo > -m
    worse         hi < 0
    inconclusive  otherwise (the interval spans 0 and reaches below -m)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

VERDICTS = ("better", "non-inferior", "worse", "inconclusive")
UNIT_INTERVAL_METRICS = {"success", "coverage", "max_coverage", "block_moved"}


@dataclass
class ArmStats:
    mean: float
    low: float
    high: float
    per_seed: list[float]
    episodes: int
    pooled_low: float | None = None   # success only: Wilson over all episodes (descriptive)
    pooled_high: float | None = None


@dataclass
class Difference:
    mean: float
    low: float | None
    high: float | None
    p_value: float | None
    per_seed: list[float]
    start_low: float | None     # start-level interval (descriptive)
    start_high: float | None


@dataclass
class MetricComparison:
    metric: str
    real: ArmStats
    refreshed: ArmStats
    difference: Difference
    verdict: str
    reason: str
    baseline: float | None = None
    higher_is_better: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def arm_stats(values: np.ndarray, metric: str, confidence: float) -> ArmStats:
    """values [n_seeds, n_episodes] of one arm."""
    per_seed = values.mean(axis=1)
    mean = float(values.mean())
    if len(per_seed) > 1 and np.ptp(per_seed) > 0:
        low, high = stats.t.interval(confidence, len(per_seed) - 1, loc=per_seed.mean(), scale=stats.sem(per_seed))
    else:
        low = high = mean
    if metric in UNIT_INTERVAL_METRICS:
        low, high = max(0.0, low), min(1.0, high)
    arm = ArmStats(mean, float(low), float(high), per_seed.tolist(), int(values.size))
    if metric == "success" and set(np.unique(values)) <= {0.0, 1.0}:
        ci = stats.binomtest(int(values.sum()), int(values.size)).proportion_ci(confidence, method="wilson")
        arm.pooled_low, arm.pooled_high = float(ci.low), float(ci.high)
    return arm


def paired_difference(real: np.ndarray, refreshed: np.ndarray, confidence: float) -> Difference:
    d_seed = refreshed.mean(axis=1) - real.mean(axis=1)
    low = high = p = None
    if len(d_seed) > 1:
        if np.ptp(d_seed) == 0:
            low = high = float(d_seed[0])  # every seed moved by exactly the same amount: no spread to test
            p = 0.0 if d_seed[0] != 0 else 1.0
        else:
            test = stats.ttest_rel(refreshed.mean(axis=1), real.mean(axis=1))
            ci = test.confidence_interval(confidence)
            low, high, p = float(ci.low), float(ci.high), float(test.pvalue)
    d_start = (refreshed - real).mean(axis=0)
    start_low = start_high = None
    if len(d_start) > 1 and np.ptp(d_start) > 0:
        start_low, start_high = stats.t.interval(confidence, len(d_start) - 1, loc=d_start.mean(),
                                                 scale=stats.sem(d_start))
    return Difference(float(d_seed.mean()), _finite(low), _finite(high), _finite(p), d_seed.tolist(),
                      _finite(start_low), _finite(start_high))


def verdict(difference: Difference, margin: float, constant: bool, seeds: int, higher_is_better: bool = True,
            below_baseline: str | None = None) -> tuple[str, str]:
    """(verdict, the reason in words) by the rule in the module docstring. `below_baseline`: why neither arm
    beats the do-nothing baseline, if so."""
    if seeds < 2:
        return "inconclusive", "fewer than 2 training seeds per arm: no interval"
    if constant:
        return "inconclusive", "the metric has the same value in every episode of both arms (floor or ceiling)"
    if below_baseline:
        return "inconclusive", below_baseline
    lo, hi = difference.low, difference.high
    if lo is None or hi is None:
        return "inconclusive", "no interval for the difference"
    where = f"{difference.mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if not higher_is_better:  # judge the improvement, real - refreshed
        lo, hi = -hi, -lo
        where += " (lower is better)"
    if lo > 0:
        return "better", f"difference {where}: the whole interval is above 0"
    if lo > -margin:
        return "non-inferior", f"difference {where}: the interval's low end is above -{margin:g} (the margin)"
    if hi < 0:
        return "worse", f"difference {where}: the whole interval is below 0"
    return "inconclusive", f"difference {where}: the interval spans 0 and reaches below -{margin:g}"


def compare_metric(metric: str, real: np.ndarray, refreshed: np.ndarray, margin: float, confidence: float,
                   higher_is_better: bool = True, baseline: float | None = None) -> MetricComparison:
    """real, refreshed: [n_seeds, n_episodes] of one metric, rows paired by seed and columns by start;
    `baseline`: what doing nothing scores on the same starts (None: unknown)."""
    real, refreshed = np.asarray(real, float), np.asarray(refreshed, float)
    if real.shape != refreshed.shape or real.ndim != 2:
        raise ValueError(f"{metric}: the arms must have the same [seeds, episodes] shape, got {real.shape} and "
                         f"{refreshed.shape}")
    difference = paired_difference(real, refreshed, confidence)
    constant = np.ptp(np.concatenate([real.ravel(), refreshed.ravel()])) == 0
    below = None
    if baseline is not None:
        beats = (lambda m: m > baseline) if higher_is_better else (lambda m: m < baseline)
        if not (beats(real.mean()) or beats(refreshed.mean())):
            below = (f"neither arm beats doing nothing: {real.mean():.3f} (real) and {refreshed.mean():.3f} "
                     f"(refreshed) vs {baseline:.3f} for the do-nothing baseline; the budget did not teach the task")
    v, reason = verdict(difference, margin, bool(constant), real.shape[0], higher_is_better, below)
    return MetricComparison(metric, arm_stats(real, metric, confidence), arm_stats(refreshed, metric, confidence),
                            difference, v, reason, baseline, higher_is_better)
