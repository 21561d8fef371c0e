"""Simulator replay separates action sequences consistent with a PushT video from inconsistent ones,
and plugs into the filter stack as the verifier filter."""

import pytest

from flywheel.data.pusht_sample import read_sample_info
from flywheel.label import load_episodes
from flywheel.quality import Clip, FilterConfig, Verifier, calibrate, filter_clips
from flywheel.quality.pusht_replay import PushTReplayVerifier


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


def test_replay_scores_gate_clips_in_the_stack(pusht):
    episodes, starts = pusht
    verifier = PushTReplayVerifier()
    n = 30

    def clip(ep, actions, kind):
        return Clip(clip_id=f"{ep.index}-{kind}", frames=ep.frames[:n], first_frame=ep.frames[0], fps=ep.fps,
                    kind=kind, extra_stats=verifier.verify(starts[ep.index], ep.frames[:n], actions, ep.fps))

    config = FilterConfig(min_frames=8)
    thresholds = calibrate([clip(ep, ep.actions[:n], "good") for ep in episodes[:3]], config)
    assert "replay_block_error" in thresholds.values
    test = [clip(episodes[3], episodes[3].actions[:n], "good"),
            clip(episodes[3], episodes[0].actions[:n], "wrong_actions")]
    df = filter_clips(test, thresholds, config).set_index("kind")
    assert df.loc["good", "pass_verifier"] and not df.loc["wrong_actions", "pass_verifier"]
    assert "verifier: replay_" in df.loc["wrong_actions", "reasons"]
