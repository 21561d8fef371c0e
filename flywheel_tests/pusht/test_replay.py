"""Simulator replay separates action sequences consistent with a PushT video from inconsistent ones,
and plugs into the filter stack as the verifier filter."""

import pytest

from flywheel.pusht.sample import read_sample_info
from flywheel.label import load_episodes
from flywheel.quality import Clip, FilterConfig, Verifier, calibrate, filter_clips
from flywheel.pusht.replay import PushTReplayVerifier, clip_source


@pytest.fixture(scope="module")
def pusht(pusht_root, episode_cache):
    episodes = load_episodes(pusht_root, [0, 1, 2, 3], image_size=96, cache_dir=episode_cache)
    starts = {e["episode_index"]: e for e in read_sample_info(pusht_root)["episodes"]}
    return episodes, starts


def test_replay_separates_consistent_from_inconsistent_actions(pusht):
    episodes, starts = pusht
    verifier = PushTReplayVerifier()
    assert isinstance(verifier, Verifier)
    n = 40
    for i, ep in enumerate(episodes[:3]):
        source = starts[ep.index]
        true = verifier.verify(source, ep.frames[:n], ep.actions[:n], ep.fps)
        reversed_ = verifier.verify(source, ep.frames[:n], ep.actions[:n][::-1].copy(), ep.fps)
        other = verifier.verify(source, ep.frames[:n], episodes[i + 1].actions[:n], ep.fps)
        assert true["replay_agent_error"] < 10 and true["replay_block_error"] < 10, true
        for bad in (reversed_, other):
            assert max(bad.values()) > 5 * max(true.values()), (true, bad)


def test_replay_scores_gate_clips_in_the_stack(pusht, pusht_root):
    episodes, _ = pusht
    verifier = PushTReplayVerifier.for_dataset(pusht_root)
    n, starts = 30, (0, 10, 20)

    def clip(ep, start, actions, kind):
        frames = ep.frames[start:start + n]
        return Clip(clip_id=f"{ep.index}-{start}-{kind}", frames=frames, first_frame=frames[0], fps=ep.fps, kind=kind,
                    meta={"episode_index": ep.index},
                    extra_stats=verifier.verify(clip_source(pusht_root, ep.index, start), frames, actions, ep.fps))

    config = FilterConfig(min_frames=8)
    real = [clip(ep, s, ep.actions[s:s + n], "good") for ep in episodes[:3] for s in starts]
    thresholds = calibrate(real, config, extra_directions=verifier.directions)
    assert {"replay_agent_error", "replay_block_error", "replay_block_overlap"} <= set(thresholds.values)
    assert thresholds.directions["replay_block_overlap"] == "min" and thresholds.directions["replay_agent_error"] == "max"
    # Task progress is a usefulness criterion the user states (quality.min_progress), never a calibrated one.
    assert "sim_progress" not in thresholds.values
    ep = episodes[3]
    test = [clip(ep, 10, ep.actions[10:10 + n], "good"), clip(ep, 10, episodes[0].actions[:n], "wrong_actions")]
    df = filter_clips(test, thresholds, config).set_index("kind")
    assert df.loc["good", "pass_verifier"] and not df.loc["wrong_actions", "pass_verifier"], df["reasons"]
    assert "verifier: replay_" in df.loc["wrong_actions", "reasons"]


def test_replay_follows_the_camera_and_measures_task_progress(robot_datasets):
    """On the rotated-camera domain the replay undoes the quarter turn; replaying a whole scripted episode
    with its recorded actions makes the progress the dataset recorded (it ends solved)."""
    root = robot_datasets / "pusht_rotated"
    verifier = PushTReplayVerifier.for_dataset(root)
    assert verifier.quarter_turns == 1 and PushTReplayVerifier.for_dataset(robot_datasets / "g1_pick_bottle") is None
    episode = load_episodes(root, [2], image_size=96)[0]
    record = read_sample_info(root)["episodes"][2]
    scores = verifier.verify(clip_source(root, 2, 0), episode.frames, episode.actions, episode.fps)
    assert scores["replay_agent_error"] < 10 and scores["replay_block_error"] < 10, scores
    assert scores["replay_block_overlap"] > 0.7
    _, _, coverage = verifier.rollout(clip_source(root, 2, 0), episode.actions, render=False)
    assert scores["sim_progress"] == pytest.approx(coverage[-1] - coverage[0])
    assert coverage[-1] > 0.8 and record["final_coverage"] > 0.95 and scores["sim_progress"] > 0.3
    # Unrotated, the same video no longer matches its own actions.
    unturned = PushTReplayVerifier().verify(clip_source(root, 2, 0), episode.frames, episode.actions, episode.fps)
    assert unturned["replay_agent_error"] > 5 * scores["replay_agent_error"]
