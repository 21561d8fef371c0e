"""Usefulness report: same-budget IDM on real-only vs real + synthetic, paired over seeds, scored on the given
held-out real episodes; a verdict from the paired difference's 95% interval where only `better` and
`non-inferior` pass: neither a comparison the seeds cannot decide nor a consistent small harm passes."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import stats

from flywheel.errors import DataError
from flywheel.label import IdmConfig, load_episodes
from flywheel.refresh import UsefulnessConfig, refresh_dataset, usefulness_report
from flywheel.refresh.usefulness import interval95, summarise, verdict_of

from .test_refresh import pusht_synthetic

torch.set_num_threads(1)


def test_mislabelled_synthetic_episodes_are_worse_on_the_given_held_out_episodes(pusht_root, episode_cache, store,
                                                                                tmp_path):
    eps = load_episodes(pusht_root, list(range(12)), image_size=96, cache_dir=episode_cache)
    synthetic = []
    for i, ep in enumerate(eps):
        clip = pusht_synthetic(pusht_root, ep, 0, seed=i, frames=100)
        # A badly biased labeller: the video is real, every action 300 px off.
        clip.actions = (clip.actions + 300).astype(np.float32)
        synthetic.append(clip)
    _, root = refresh_dataset(pusht_root, synthetic, store)
    config = UsefulnessConfig(idm=IdmConfig(image_size=32, width=16, steps=150, lr=3e-3, frame_gap=2, augment_shift=2))
    assert config.seeds == [0, 1, 2] and config.margin == 0.05  # the defaults
    held_out = [13, 16, 19]  # none of them lent its video to a synthetic episode
    result = usefulness_report(root, config, tmp_path / "report", cache_dir=episode_cache, held_out=held_out)
    table = result.table
    assert len(table) == 6 and set(table["arm"]) == {"real_only", "real_plus_synthetic"}
    assert (table.groupby("arm")["steps"].first() == 150).all()  # same budget
    s = result.summary
    assert result.verdict == s["verdict"] == "worse" and not result.gate_passed, s
    assert s["held_out_episodes"] == held_out and s["held_out_source"].startswith("the manifest's held-out")
    assert s["train_episodes"] == [e for e in range(20) if e not in held_out]
    assert s["synthetic_episodes"] == list(range(20, 32)) and s["seeds"] == [0, 1, 2]
    # the interval is scipy's paired t interval of the per-seed differences
    paired = table.pivot(index="seed", columns="arm", values="mae_mean")
    expected = stats.ttest_rel(paired["real_plus_synthetic"], paired["real_only"]).confidence_interval(0.95)
    assert s["paired_difference"]["ci95"] == pytest.approx([expected.low, expected.high])
    assert s["paired_difference"]["ci95"][0] > 0 and "lo > 0" in s["rule"]
    assert pd.read_csv(result.table_path).shape == (6, 7)
    written = json.loads(result.summary_path.read_text())
    assert written["verdict"] == "worse" and written["gate_passed"] is False and written["rule"] == s["rule"]
    assert Image.open(result.plot_path).size == (720, 330)


def test_held_out_episodes_must_be_real_episodes_of_the_version(pusht_root, episode_cache, store, tmp_path):
    eps = load_episodes(pusht_root, [0], image_size=96, cache_dir=episode_cache)
    _, root = refresh_dataset(pusht_root, [pusht_synthetic(pusht_root, eps[0], 0, seed=0)], store)
    with pytest.raises(DataError, match=r"held-out episodes \[20\] are not real episodes"):
        usefulness_report(root, UsefulnessConfig(), tmp_path / "r", held_out=[3, 20])
    with pytest.raises(DataError, match="leave 0 real training episodes"):
        usefulness_report(root, UsefulnessConfig(), tmp_path / "r", held_out=list(range(20)))


def paired(real: list[float], synthetic: list[float]) -> pd.DataFrame:
    seeds = range(len(real))
    return pd.DataFrame(dict(arm=["real_only"] * len(real) + ["real_plus_synthetic"] * len(real),
                             seed=[*seeds, *seeds], mae_mean=[*real, *synthetic]))


def test_verdicts_and_what_passes():
    real = [10.0, 11.0, 9.0]
    better = summarise(paired(real, [9.0, 10.1, 8.0]), margin=0.05)
    assert better["verdict"] == "better" and better["gate_passed"] and better["paired_difference"]["ci95"][1] < 0
    # A consistent +2% (inside a 5% margin): measurably harmful, not "within tolerance".
    small_harm = summarise(paired(real, [10.2, 11.22, 9.18]), margin=0.05)
    assert small_harm["verdict"] == "worse" and not small_harm["gate_passed"]
    assert small_harm["relative_change"] == pytest.approx(0.02)
    # Around zero, tight: non-inferior (passes).
    tight = summarise(paired(real, [10.05, 10.95, 9.02]), margin=0.05)
    assert tight["verdict"] == "non-inferior" and tight["gate_passed"]
    assert tight["paired_difference"]["relative_ci95"][1] < 0.05
    # The seeds disagree: the interval reaches past the margin, which is not a pass.
    noisy = summarise(paired(real, [9.0, 12.0, 9.3]), margin=0.05)
    assert noisy["verdict"] == "inconclusive" and not noisy["gate_passed"]
    # One seed has no interval.
    assert summarise(paired([10.0], [9.0]), margin=0.05)["verdict"] == "inconclusive"
    assert verdict_of(-1.0, 0.4, 0.5, seeds=3) == "non-inferior" and verdict_of(-1.0, 0.5, 0.5, seeds=3) == "inconclusive"


def test_interval_is_the_student_t_interval():
    x = np.array([1.0, 2.0, 4.0])
    m, lo, hi = interval95(x)
    half = stats.t.ppf(0.975, 2) * x.std(ddof=1) / np.sqrt(3)
    assert (m, lo, hi) == pytest.approx((7 / 3, 7 / 3 - half, 7 / 3 + half))
    assert interval95(np.array([2.0])) == (2.0, 2.0, 2.0) and interval95(np.array([3.0, 3.0])) == (3.0, 3.0, 3.0)
