"""Fixtures of the policy evaluation tests: the embedded rotated PushT domain, a real refreshed version of it,
and a tiny LeRobot ACT budget (real classes, toy size, a few steps)."""

from pathlib import Path

import pytest

from flywheel_tests.conftest import DATASETS


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def refreshed_root(rotated_root, tmp_path_factory, episode_cache) -> Path:
    """A refreshed version of the rotated domain made by flywheel's own refresh: the 10 real episodes plus two
    'synthetic' ones (real windows at the generator's 16 fps and 64 px, their environment state from the
    simulator replay of their actions), as the refreshed_dataset stage writes them."""
    from flywheel.pusht.sample import read_sample_info
    from flywheel.label import load_episodes
    from flywheel.label.labeling import nearest_indices, resample_actions
    from flywheel.pusht.replay import PushTReplayVerifier
    from flywheel.refresh import SyntheticEpisode, refresh_dataset
    from flywheel.store import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("policy_home"))
    episodes = load_episodes(rotated_root, [0, 1], image_size=64, cache_dir=episode_cache)
    clips = []
    for seed, ep in enumerate(episodes):
        idx = nearest_indices(len(ep), ep.fps, 16.0)[:17]
        actions = resample_actions(ep.actions, ep.fps, 16.0)[:17]
        clip = SyntheticEpisode(frames=ep.frames[idx], actions=actions, fps=16.0, provenance=dict(
            clip_id=f"clip-{ep.index}", adapter_version="lora-test", seed=seed, prompt="push the T",
            source_episode=ep.index, filter_scores={}))
        source = read_sample_info(rotated_root)["episodes"][ep.index]
        clip.features["observation.environment_state"] = PushTReplayVerifier().environment_states(source, actions, 16.0)
        clips.append(clip)
    _, root = refresh_dataset(rotated_root, clips, store)
    return root


TINY_ACT = dict(dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                n_vae_encoder_layers=1, latent_dim=8, chunk_size=4, n_action_steps=2)


@pytest.fixture
def tiny_config():
    """Two seeds, three episodes of 12 steps, 3 training steps of batch 4: the plumbing, not a measurement."""
    from flywheel.policy import PolicyEvalConfig

    return PolicyEvalConfig(
        policy=dict(type="act", steps=3, batch_size=4, overrides=TINY_ACT),
        rollout=dict(episodes=3, max_steps=12, batch=3, video_episodes=1),
        seeds=[0, 1],
    )
