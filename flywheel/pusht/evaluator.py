"""The PushT simulator as a policy evaluator (flywheel.policy.evaluators.PolicyEvaluator): the built-in one,
which rolls out each arm's trained LeRobot policy, and a scripted one of the plug-in kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flywheel.policy.config import PolicyEvalConfig, RolloutConfig
from flywheel.policy.evaluators import ArmPolicy, EpisodeResult
from flywheel.pusht.simulator import (
    IdleActions,
    LeRobotPolicyActions,
    PushTSimulator,
    ScriptedActions,
    rollout,
    starts_from_seeds,
)


def _results(outcomes) -> list[EpisodeResult]:
    return [EpisodeResult(o.metrics(), o.frames, dict(reset_seed=o.reset_seed, initial_state=o.initial_state,
                                                      block_path=o.block_path)) for o in outcomes]


class SimulatorEvaluator:
    """The built-in one: the arm's trained LeRobot policy, closed-loop in the PushT simulator through the
    domain's camera."""

    needs_policy = True

    def __init__(self, simulator: PushTSimulator, rollout_config: RolloutConfig) -> None:
        self.simulator, self.rollout_config = simulator, rollout_config
        self.name = f"pusht-sim[{simulator.variant.name}]"

    def evaluate(self, arm: ArmPolicy, episode_seeds: list[int]) -> list[EpisodeResult]:
        if arm.policy is None:
            raise ValueError(f"{self.name} rolls out a trained policy; arm {arm.arm} seed {arm.seed} has none")
        outcomes = rollout(self.simulator, LeRobotPolicyActions(arm.policy), starts_from_seeds(episode_seeds),
                           self.rollout_config.max_steps, self.rollout_config.batch, arm.keep_frames)
        return _results(outcomes)

    def baseline(self, episode_seeds: list[int]) -> dict[str, float]:
        """Mean success / coverage of an agent that holds still (10 steps: it never touches the block, so the
        block stays as it starts; steps are not comparable and left out)."""
        outcomes = rollout(self.simulator, IdleActions(), starts_from_seeds(episode_seeds), 10,
                           self.rollout_config.batch)
        metrics = [o.metrics() for o in outcomes]
        return {k: float(np.mean([m[k] for m in metrics])) for k in ("success", "coverage", "max_coverage",
                                                                      "block_moved")}


class ScriptedPushTEvaluator:
    """A small but real evaluation of the plug-in kind: the PushT simulator driven by the sample's scripted
    expert, not by the arm's policy (so both arms score the same). What a user evaluator looks like: it gets
    the start list, runs its own controller in its own world, and reports metrics per episode."""

    needs_policy = False

    def __init__(self, simulator: PushTSimulator, max_steps: int = 300, batch: int = 50) -> None:
        self.simulator, self.max_steps, self.batch = simulator, max_steps, batch
        self.name = f"scripted-pusht[{simulator.variant.name}]"

    def evaluate(self, arm: ArmPolicy, episode_seeds: list[int]) -> list[EpisodeResult]:
        outcomes = rollout(self.simulator, ScriptedActions(), starts_from_seeds(episode_seeds), self.max_steps, self.batch,
                           arm.keep_frames)
        return _results(outcomes)


def scripted_pusht(config: PolicyEvalConfig, dataset_root: Path) -> ScriptedPushTEvaluator:
    """Factory of ScriptedPushTEvaluator (`policy.evaluator: flywheel.pusht.evaluator:scripted_pusht`)."""
    return ScriptedPushTEvaluator(PushTSimulator.from_dataset(dataset_root), config.rollout.max_steps,
                                  config.rollout.batch)
