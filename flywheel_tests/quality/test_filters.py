"""The filter stack on real G1 clips: thresholds from real percentiles, each corruption caught by its
filter, real clips kept; scores and reasons stored; mp4 inputs decoded or rejected with a reason."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flywheel.data.video import write_video
from flywheel.label import load_actions, load_episodes
from flywheel.quality import (FILTER_VERSION, FilterConfig, Thresholds, calibrate, make_validation_clips, real_clips,
                              run_filters, save_report, validate_filters)
from flywheel.quality.browse import write_browse
from flywheel.quality.corruptions import TARGETS

CLIP = dict(num_frames=17, fps=16)  # what the tiny generator makes


@pytest.fixture(scope="module")
def g1(robot_datasets, episode_cache):
    episodes = load_episodes(robot_datasets / "g1_pick_bottle", list(range(6)), image_size=64, cache_dir=episode_cache)
    config = FilterConfig()
    calibration = real_clips(episodes[:4], stride_s=0.5, **CLIP)
    # Action ranges from every real episode except the held-out ones (parquet only, nothing to decode).
    real_actions = load_actions(robot_datasets / "g1_pick_bottle", list(range(6, 12)))
    thresholds = calibrate(calibration, config, action_episodes=real_actions, source={"episodes": list(range(4))})
    held_out = real_clips(episodes[4:], stride_s=1.5, **CLIP)
    return episodes, config, thresholds, held_out


def test_each_filter_catches_its_corruption_and_keeps_real_clips(g1, tmp_path):
    _, config, thresholds, held_out = g1
    clips = make_validation_clips(held_out, seed=0, action_scale=np.array(thresholds.action_reference["scale"]))
    report, results = validate_filters(clips, thresholds, config)
    assert set(report["filter_version"]) == {FILTER_VERSION}
    by_kind = report[report.scope == "kind"].set_index("name")
    assert set(by_kind.index) == set(TARGETS)
    for kind, filters in TARGETS.items():
        is_kind = results["kind"] == kind
        caught = (~results.loc[is_kind, [f"pass_{f}" for f in filters]]).any(axis=1).mean()
        assert caught >= 0.95, f"{kind}: its filter {filters} caught only {caught:.0%}"
    stack = report[(report.scope == "stack") & (report.name == "all")].iloc[0]
    assert stack.recall >= 0.9 and stack.precision >= 0.95, stack
    kept = report[report.name == "good_kept"].iloc[0]
    assert kept.recall >= 0.94, kept  # real clips from unseen episodes pass (at most one of 19 rejected)
    rejected = results[~results.accepted]
    assert (rejected["reasons"].str.len() > 0).all()
    assert rejected["reasons"].str.contains("static: frozen_tail").any()
    # Stored and browsable: the report per version, every score per clip, plots.
    assert save_report(report, tmp_path).name == f"filter_validation_v{FILTER_VERSION}.csv"
    paths = write_browse(results, tmp_path / "browse", thresholds,
                         frames={c.clip_id: np.asarray(c.frames) for c in clips})
    stored = pd.read_parquet(paths["results"])
    assert len(stored) == len(clips) and {"motion", "psnr_first", "accepted", "reasons"} <= set(stored.columns)
    assert Image.open(paths["scores"]).size[1] > 300 and Image.open(paths["rejected"]).size[1] > 64


def test_thresholds_json_roundtrip_versions_and_overrides(g1, tmp_path):
    _, config, thresholds, held_out = g1
    path = thresholds.save(tmp_path / "thresholds.json")
    loaded = Thresholds.load(path)
    assert loaded.values == thresholds.values and loaded.filter_version == FILTER_VERSION
    assert loaded.real_quantiles["sharpness_ratio"]["p50"] > loaded.values["sharpness_ratio"]  # "at least" below the median
    stale = path.read_text().replace(f'"filter_version": "{FILTER_VERSION}"', '"filter_version": "0"')
    (tmp_path / "stale.json").write_text(stale)
    with pytest.raises(ValueError, match="re-run calibrate"):
        Thresholds.load(tmp_path / "stale.json")
    clips = held_out[:3]
    args = ([c.frames for c in clips], [c.first_frame for c in clips], None, loaded)
    assert run_filters(*args, config, fps=16)["pass_static"].all()
    strict = config.model_copy(update={"overrides": {"frozen_tail": -1.0}})
    assert not run_filters(*args, strict, fps=16)["pass_static"].any()
    with pytest.raises(ValueError, match="unknown stats"):
        run_filters(*args, config.model_copy(update={"overrides": {"nope": 1}}), fps=16)


def test_mp4_inputs_decoded_or_rejected_with_reason(g1, tmp_path):
    _, config, thresholds, held_out = g1
    clip = held_out[0]
    good = write_video(tmp_path / "good.mp4", np.asarray(clip.frames), fps=16)
    frozen = write_video(tmp_path / "frozen.mp4", np.repeat(np.asarray(clip.frames)[:1], 17, axis=0), fps=16)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good.read_bytes()[:300])
    df = run_filters([good, frozen, broken, tmp_path / "missing.mp4"], [clip.first_frame] * 4, None, thresholds,
                     config, fps=16, clip_ids=["good", "frozen", "broken", "missing"]).set_index("clip_id")
    assert df.loc["good", ["pass_decode", "pass_first_frame", "pass_static", "pass_blur_exposure"]].all()
    assert not df.loc["frozen", "pass_static"] and not df.loc["frozen", "accepted"]
    for name in ("broken", "missing"):
        assert not df.loc[name, "pass_decode"] and "decode:" in df.loc[name, "reasons"]
        assert name in df.loc[name, "reasons"]  # the reason names the file


def test_near_duplicate_seeds_of_one_prompt(g1):
    _, config, thresholds, held_out = g1
    a, b = held_out[0], held_out[3]
    noisy = np.clip(np.asarray(a.frames) + np.random.default_rng(0).normal(0, 2, np.shape(a.frames)), 0, 255)
    videos = [a.frames, noisy.astype(np.uint8), b.frames]
    df = run_filters(videos, [a.first_frame, a.first_frame, b.first_frame], None, thresholds, config, fps=16,
                     groups=["prompt-1", "prompt-1", "prompt-1"])
    assert df["pass_duplicate"].tolist() == [True, False, True]
