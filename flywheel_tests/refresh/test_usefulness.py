"""Usefulness report: same-budget IDM on real-only vs real + synthetic, held-out real error with seeds and
intervals, table + plot, and a gate that fails when synthetic data makes held-out real error worse."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flywheel.label import IdmConfig, load_episodes
from flywheel.refresh import UsefulnessConfig, refresh_dataset, usefulness_report
from flywheel.refresh.usefulness import interval95, summarise

from .test_refresh import pusht_synthetic

torch.set_num_threads(1)


def test_gate_fails_when_synthetic_actions_are_garbage(pusht_root, episode_cache, store, tmp_path):
    eps = load_episodes(pusht_root, list(range(8)), image_size=96, cache_dir=episode_cache)
    rng = np.random.default_rng(0)
    synthetic = []
    for i, ep in enumerate(eps):
        clip = pusht_synthetic(pusht_root, ep, 0, seed=i, frames=100)
        # Wrongly labelled clips: the video is real, the actions are noise over the whole workspace.
        clip.actions = rng.uniform(0, 512, clip.actions.shape).astype(np.float32)
        synthetic.append(clip)
    _, root = refresh_dataset(pusht_root, synthetic, store)
    config = UsefulnessConfig(seeds=[0, 1], tolerance=0.05,
                              idm=IdmConfig(image_size=32, width=16, steps=200, lr=3e-3, frame_gap=2, augment_shift=2))
    result = usefulness_report(root, config, tmp_path / "report", cache_dir=episode_cache)
    table = result.table
    assert len(table) == 4 and set(table["arm"]) == {"real_only", "real_plus_synthetic"}
    assert (table.groupby("arm")["steps"].first() == 200).all()  # same budget
    assert not result.gate_passed, result.summary
    s = result.summary
    assert s["arms"]["real_plus_synthetic"]["mean"] > s["arms"]["real_only"]["mean"]
    assert len(s["val_episodes"]) == 4 and s["synthetic_episodes"] == list(range(20, 28))
    assert pd.read_csv(result.table_path).shape == (4, 7)
    assert json.loads(result.summary_path.read_text())["gate_passed"] is False
    assert Image.open(result.plot_path).size == (520, 300)


def test_gate_rule_and_intervals():
    table = pd.DataFrame(dict(arm=["real_only", "real_plus_synthetic"] * 3, seed=[0, 0, 1, 1, 2, 2],
                              mae_mean=[1.0, 0.9, 1.1, 1.0, 0.9, 0.8]))
    s = summarise(table, tolerance=0.0)
    assert s["gate_passed"] and s["paired_difference"]["mean"] == pytest.approx(-0.1)
    lo, hi = s["arms"]["real_only"]["ci95"]
    assert lo < 1.0 < hi
    assert not summarise(table.assign(mae_mean=table["mae_mean"][::-1].to_numpy()), 0.05)["gate_passed"]
    assert interval95(np.array([2.0])) == (2.0, 2.0, 2.0)
