"""Calibration rules that the end-to-end tests cannot isolate: a threshold beyond what its statistic can
reach is repaired and says so; action thresholds are never stricter than the domain's real actions."""

import numpy as np
import pandas as pd

from flywheel.label import load_actions
from flywheel.quality import FilterConfig
from flywheel.quality.calibration import real_action_clip_quantiles, thresholds_from_scores
from flywheel.quality.stats import action_reference


def test_a_threshold_that_cannot_fire_is_repaired_to_the_most_extreme_real_value():
    # One real clip of each episode stops moving for 60% of its steps (PushT demonstrations end at rest):
    # percentile + slack put the frozen-tail threshold beyond 1, the most a clip can reach.
    tails = np.r_[np.zeros(20), 0.6, 0.0, 0.0, 0.0, 0.58]
    scores = pd.DataFrame({"frozen_tail": tails})
    episodes = [str(i % 2) for i in range(len(tails))]
    config = FilterConfig(held_out_rejection=0.0)
    thresholds = thresholds_from_scores(scores, episodes, config, {"frozen_tail": "max"})
    assert thresholds.values["frozen_tail"] == 0.6
    assert any("frozen_tail" in n and "repaired to the most extreme real value, 0.6" in n for n in thresholds.notes)


def test_action_thresholds_are_never_stricter_than_the_real_actions(robot_datasets):
    episodes = load_actions(robot_datasets / "pusht_rotated", [0, 1, 2, 3])
    reference = action_reference([e.actions for e in episodes], episodes[0].fps)
    real = real_action_clip_quantiles([e.actions for e in episodes], episodes[0].fps, 17, 16.0, reference, 99.0)
    assert set(real) == {"action_velocity", "action_jerk"} and all(v > 0 for v in real.values())
    # IDM labels of real clips are smoother than the real actions: their calibrated threshold alone would be lower.
    smooth = pd.DataFrame({"action_velocity": np.linspace(0.1, 0.6, 40), "action_jerk": np.linspace(0.1, 0.9, 40)})
    thresholds = thresholds_from_scores(smooth, [str(i % 4) for i in range(40)], FilterConfig(),
                                        {"action_velocity": "max", "action_jerk": "max"},
                                        action_reference={**reference, "real_clip_quantile": real})
    for stat, value in real.items():
        assert thresholds.values[stat] == max(value, thresholds.real_quantiles[stat]["p_hi"] +
                                              thresholds.slack[stat] * (thresholds.real_quantiles[stat]["p_hi"] -
                                                                        thresholds.real_quantiles[stat]["p50"]))
        assert thresholds.values[stat] >= value


def test_training_episodes_calibrate_the_video_statistics_but_not_the_action_ones(robot_datasets, episode_cache):
    from flywheel.label import load_episodes
    from flywheel.quality import real_clips
    from flywheel.quality.calibration import calibrate, spread, video_calibration_clips

    root = robot_datasets / "pusht_rotated"
    held = real_clips(load_episodes(root, [4, 5], image_size=64, cache_dir=episode_cache), 17, 16.0)
    train_episodes = load_episodes(root, [0, 1, 2, 3], image_size=64, cache_dir=episode_cache)
    video = video_calibration_clips(train_episodes, 17, 16.0, max_clips=12)
    assert len(video) == 12 and all(c.actions is None for c in video)
    assert {c.meta["episode_index"] for c in video} == {0, 1, 2, 3}  # spread over every training episode
    assert spread(list(range(10)), 4) == [0, 3, 6, 9] and spread([1, 2], 4) == [1, 2] and spread([1], 0) == []

    config = FilterConfig()
    actions = load_actions(root, [0, 1, 2, 3])
    alone = calibrate(held, config, actions)
    both = calibrate(held + video, config, actions)
    assert both.num_real_clips == len(held) + 12
    # Action statistics come from the held-out clips only; the video statistics see every clip.
    for stat in ("action_velocity", "action_jerk", "action_range"):
        assert both.real_quantiles[stat] == alone.real_quantiles[stat], stat
    assert both.real_quantiles["flicker"] != alone.real_quantiles["flicker"]
