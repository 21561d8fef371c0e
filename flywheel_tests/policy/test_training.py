"""Training a LeRobot policy on a dataset version: seeded, config errors named, both policy types drivable."""

import numpy as np
import pytest
from pydantic import ValidationError

from flywheel.errors import ConfigError, DataError
from flywheel.policy import PolicyEvalConfig, PolicyTrainConfig, gpu_config, train_policy
from flywheel.policy.compare import episode_seeds
from flywheel.pusht.simulator import LeRobotPolicyActions, PushTSimulator, rollout, starts_from_seeds
from flywheel_tests.policy.conftest import TINY_ACT


def test_training_is_seeded(rotated_root):
    config = PolicyTrainConfig(steps=3, batch_size=4, overrides=TINY_ACT)
    a, b, c = (train_policy(rotated_root, config, seed) for seed in (0, 0, 1))
    assert a.losses == b.losses and a.losses != c.losses
    assert len(a.losses) == 3 and all(np.isfinite(a.losses))
    assert a.num_episodes == 10 and a.num_frames == 1140
    assert set(a.policy.config.input_features) == {"observation.image", "observation.state"}


def test_checkpoints_see_the_policy_mid_run_without_changing_it(rotated_root):
    config = PolicyTrainConfig(steps=4, batch_size=4, overrides=TINY_ACT)
    seen = []
    trained = train_policy(rotated_root, config, 0, checkpoints=(2, 4), on_checkpoint=lambda t: seen.append(
        (t.steps, len(t.losses), t.policy.training)))
    assert seen == [(2, 2, False), (4, 4, False)]
    assert trained.losses == train_policy(rotated_root, config, 0).losses


def test_config_errors_name_the_field(rotated_root):
    with pytest.raises(ValidationError):
        PolicyEvalConfig(policy=dict(steps=3, learning_rate=1.0))
    with pytest.raises(ValidationError, match="each training seed once"):
        PolicyEvalConfig(seeds=[0, 0])
    with pytest.raises(ConfigError, match="policy.overrides"):
        train_policy(rotated_root, PolicyTrainConfig(steps=1, overrides=dict(no_such_field=1)), 0)
    with pytest.raises(DataError, match="policy.input_features"):
        train_policy(rotated_root, PolicyTrainConfig(steps=1, input_features=["observation.images.wrist"]), 0)
    assert gpu_config().policy.type == "diffusion" and len(gpu_config().seeds) >= 3


def test_diffusion_policy_trains_and_rolls_out(rotated_root):
    """The GPU setting's policy type, at toy size: two observation steps and an action horizon through the
    same training and rollout code."""
    config = PolicyTrainConfig(type="diffusion", steps=2, batch_size=4, overrides=dict(
        down_dims=(16, 32), horizon=8, n_action_steps=4, drop_n_last_frames=3, num_inference_steps=2,
        diffusion_step_embed_dim=16, spatial_softmax_num_keypoints=8))
    trained = train_policy(rotated_root, config, seed=0)
    assert trained.policy.config.n_obs_steps == 2 and np.isfinite(trained.losses).all()
    sim = PushTSimulator.from_dataset(rotated_root)
    outcomes = rollout(sim, LeRobotPolicyActions(trained), starts_from_seeds(episode_seeds(5, 2)), max_steps=6)
    assert [o.steps for o in outcomes] == [6, 6]
