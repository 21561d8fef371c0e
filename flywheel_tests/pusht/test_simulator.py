"""The simulator side: the policy sees the domain's camera exactly as the dataset recorded it, and the rollouts'
numbers are the env's own."""

import numpy as np
import pytest

from flywheel.policy.compare import episode_seeds
from flywheel.pusht.sample import environment_state, make_env, read_sample_info, rollout_episode
from flywheel.pusht.simulator import (
    PushTSimulator,
    ScriptedActions,
    coverage_of_states,
    rollout,
    simulator_for_dataset,
    starts_from_seeds,
)


def test_rotated_observation_matches_the_datasets_frames(rotated_root, episode_cache):
    """Replay episode 0's recorded actions from its recorded start: the simulator's observation, through the
    domain's camera, is the dataset's frame of the same state (up to the AV1 encoding); the unturned view is not."""
    from flywheel.label import load_episodes

    sim = PushTSimulator.from_dataset(rotated_root)
    assert sim.variant.name == "rotated" and sim.variant.quarter_turns == 1 and sim.image_size == 96
    keys = ("observation.state", "observation.environment_state")
    episode = load_episodes(rotated_root, [0], image_size=96, extra_keys=keys, cache_dir=episode_cache)[0]
    start = read_sample_info(rotated_root)["episodes"][0]
    env = make_env(sim.image_size)
    obs, info = env.reset(seed=start["reset_seed"], options={"reset_to_state": start["initial_state"]})
    turned, unturned = [], []
    for t in range(len(episode)):
        seen = sim.observe(obs, info)
        np.testing.assert_allclose(seen["agent_pos"], episode.extras[keys[0]][t], atol=1e-3)
        np.testing.assert_allclose(seen["environment_state"], episode.extras[keys[1]][t], atol=1e-3)
        turned.append(wrong_pixels(seen["pixels"], episode.frames[t]))
        unturned.append(wrong_pixels(obs["pixels"], episode.frames[t]))
        obs, _, _, _, info = env.step(episode.actions[t])
    env.close()
    assert len(turned) > 50 and max(turned) < 0.01, f"camera view vs recorded frame: {max(turned):.1%} pixels differ"
    assert min(unturned) > 0.03, "the unturned render must not match: the test would not see a wrong view"


def wrong_pixels(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels more than 64 gray levels apart in some channel: objects in different places, not the
    codec's small errors at their edges."""
    return float((np.abs(a.astype(int) - b.astype(int)).max(axis=-1) > 64).mean())


def test_scripted_rollouts_are_the_simulators_own(rotated_root):
    """The batched rollout of the scripted expert gives, episode for episode, what the sample generator's own
    rollout of that expert gives in gym-pusht: same success, same length, the same env-computed coverage (up to
    the expert reading the state as the float32 observation here and as the env's float64 there)."""
    sim = simulator_for_dataset(rotated_root)
    seeds = episode_seeds(123, 3)
    outcomes = rollout(sim, ScriptedActions(), starts_from_seeds(seeds), max_steps=60, batch=2, keep_frames=1)
    env = make_env(sim.image_size)
    for outcome, seed in zip(outcomes, seeds):
        reference = rollout_episode(env, seed, 60, sim.variant)
        assert outcome.steps == len(reference.actions)
        assert outcome.success == reference.success
        assert outcome.final_coverage == pytest.approx(reference.final_coverage, rel=1e-4, abs=1e-6)
        assert outcome.max_coverage == pytest.approx(reference.max_coverage, rel=1e-4, abs=1e-6)
    env.close()
    assert max(o.max_coverage for o in outcomes) > 0.1 and all(o.block_path > 1.0 for o in outcomes)
    frames = outcomes[0].frames
    assert outcomes[1].frames is None and len(frames) == outcomes[0].steps + 1
    assert frames[0].shape == (96, 96, 3) and not np.array_equal(frames[0], frames[-1]), "the scene moved"


class FixedTarget:
    """Every agent heads for one point: the env must move it there, and nothing else is needed to check that."""

    def __init__(self, target):
        self.target, self.calls = np.asarray(target, float), 0

    def reset(self):
        self.calls = 0

    def __call__(self, observation):
        self.calls += 1
        return np.tile(self.target, (len(observation["agent_pos"]), 1))


def test_actions_drive_the_env_state(rotated_root):
    sim = simulator_for_dataset(rotated_root)
    starts = starts_from_seeds(episode_seeds(7, 2))
    source = FixedTarget([256.0, 100.0])
    outcomes = rollout(sim, source, starts, max_steps=25, batch=2, keep_frames=2)
    assert source.calls == 25 and all(o.steps == 25 for o in outcomes)
    env = make_env(sim.image_size)
    for outcome, (seed, state) in zip(outcomes, starts):
        assert np.hypot(state[0] - 256, state[1] - 100) > 30, "a start already at the target proves nothing"
        obs, info = env.reset(seed=seed, options={"reset_to_state": state})
        for _ in range(25):
            obs, _, _, _, info = env.step(np.array([256.0, 100.0]))
        assert np.hypot(*(np.asarray(info["pos_agent"]) - [256, 100])) < 5.0, "the agent reached the target"
        assert outcome.final_coverage == info["coverage"]
        assert np.array_equal(outcome.frames[-1], sim.variant.show(obs["pixels"]))
    env.close()


def test_coverage_of_recorded_states_is_the_envs(rotated_root):
    """What the benchmark computes for a synthetic episode's replayed states: the env's coverage of that state."""
    from flywheel.pusht.sample import ScriptedPusher

    sim = simulator_for_dataset(rotated_root)
    (seed, state), = starts_from_seeds(episode_seeds(123, 1))
    env, pusher = make_env(sim.image_size), ScriptedPusher()
    obs, info = env.reset(seed=seed, options={"reset_to_state": state})
    states, coverages = [], []
    for _ in range(60):
        obs, _, _, _, info = env.step(pusher.act(info["pos_agent"], info["block_pose"]))
        states.append(environment_state(info))
        coverages.append(info["coverage"])
    env.close()
    assert max(coverages) > 0.1, "the block reached the goal area: coverage is not trivially 0"
    np.testing.assert_allclose(coverage_of_states(sim, np.stack(states)), coverages, atol=1e-3)


def test_no_simulator_for_a_dataset_without_one(robot_datasets):
    from flywheel.errors import DataError

    assert simulator_for_dataset(robot_datasets / "g1_pick_bottle") is None
    with pytest.raises(DataError, match="pusht_sample.json"):
        PushTSimulator.from_dataset(robot_datasets / "g1_pick_bottle")
