"""Config of the closed-loop policy evaluation: the policy trained in both arms, its budget, the rollouts,
and the verdict rule. Everything a comparison's numbers are a function of is here (plus the two datasets)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Metric = Literal["success", "coverage"]


class PolicyTrainConfig(BaseModel):
    """The LeRobot policy trained on each arm's dataset: same type, shape and budget in both arms."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["act", "diffusion"] = Field(
        "act", description="LeRobot policy class (lerobot.policies): act | diffusion")
    steps: int = Field(400, ge=1, description="gradient steps per training run (the budget, same in both arms)")
    batch_size: int = Field(16, ge=1)
    lr: float | None = Field(
        1e-4, gt=0, description="optimizer learning rate (backbone included); None keeps the LeRobot policy's own "
                                "preset (ACT: 1e-5, meant for ~100k steps; too small for a short budget)")
    input_features: list[str] = Field(
        ["observation.image", "observation.state"], min_length=1,
        description="dataset features the policy sees. The default is what a camera-driven robot has: the image "
                    "and its own position; observation.environment_state (the block's pose) is left out on purpose, "
                    "since a synthetic episode's value comes from replaying its pseudo-actions, not from its video")
    overrides: dict = Field(
        default_factory=dict,
        description="extra fields of the LeRobot policy config (ACTConfig / DiffusionConfig), e.g. "
                    "{dim_model: 512, chunk_size: 100}; applied after the preset's own")
    cache_frames: bool = Field(
        True, description="keep each decoded training sample in memory after its first use: the small datasets "
                          "here are decoded once instead of once per epoch")


class RolloutConfig(BaseModel):
    """Closed-loop episodes in the simulator: the same start list for every arm and every training seed."""

    model_config = ConfigDict(extra="forbid")

    episodes: int = Field(50, ge=1, description="episodes per (arm, training seed)")
    start_seed: int = Field(
        10_000, ge=0, lt=2**32,
        description="master seed of the start list: episode i starts from episode_reset_seed(start_seed, i), drawn "
                    "like the PushT sample's episodes; far from the sample datasets' own seeds (0, 1, ...)")
    max_steps: int = Field(300, ge=1, le=300, description="actions per episode at most (gym-pusht's own limit is 300)")
    batch: int = Field(50, ge=1, description="episodes stepped together (one batched policy call per step)")
    video_episodes: int = Field(4, ge=0, description="episodes per arm kept as frames for the contact sheet and video")


class VerdictConfig(BaseModel):
    """The rule, on the paired difference refreshed - real of a metric (see flywheel.policy.statistics)."""

    model_config = ConfigDict(extra="forbid")

    primary: Metric | str = Field(
        "coverage", description="the metric whose verdict is the comparison's verdict (success | coverage | a metric "
                                "your evaluator reports)")
    margin: float = Field(0.05, ge=0, description="non-inferiority margin, in the metric's units")
    lower_is_better: list[str] = Field(["steps"], description="metrics where a decrease is the improvement")
    confidence: float = Field(0.95, gt=0, lt=1)


class PolicyEvalConfig(BaseModel):
    """One comparison: train the same policy on the real and on the refreshed version (same budget, same seeds),
    roll each out on the same starts, and compare."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyTrainConfig = Field(default_factory=PolicyTrainConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds; each arm is trained once per seed")
    device: str = Field("cpu", description="torch device for training and rollouts (cpu, cuda, cuda:1, ...)")
    evaluator: str | None = Field(
        None, description="your own evaluation instead of the built-in simulator: an entry point name in the group "
                          "'flywheel.policy_evaluators' or 'package.module:factory' (see docs/policy.md)")

    @model_validator(mode="after")
    def _distinct_seeds(self) -> PolicyEvalConfig:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds}: each training seed once")
        return self


def cpu_config(**changes) -> PolicyEvalConfig:
    """The CPU-sized default: a small ACT (one ResNet-18 camera, d=256, 2+1 layers), 400 steps of batch 16 per arm
    and seed; 3 seeds x 50 episodes per arm. See docs/policy.md for how long it takes."""
    return PolicyEvalConfig(**changes)


def gpu_config(**changes) -> PolicyEvalConfig:
    """The larger GPU setting: LeRobot's diffusion policy in its PushT shape, 20k steps of batch 64, 5 seeds."""
    base = dict(
        policy=PolicyTrainConfig(type="diffusion", steps=20_000, batch_size=64, lr=1e-4),
        seeds=[0, 1, 2, 3, 4],
        device="cuda",
    )
    return PolicyEvalConfig(**{**base, **changes})


# Measured on this repository's shared 2-core CPU, 1 torch thread (benchmarks/results/policy-usefulness-cpu.json:
# 200 steps of batch 8 in ~190 s; 50 episodes x 300 steps in ~150 s, the policy's own calls included). Only
# used to tell a user how long opting in on a CPU takes.
CPU_SECONDS_PER_SAMPLE = 0.12
CPU_SECONDS_PER_ENV_STEP = 0.01


class PolicyStageConfig(BaseModel):
    """The `policy` section of the run config: the policy_evaluation stage (after refreshed_dataset)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    evaluate: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: run where a GPU is present, otherwise record 'not evaluated' (too slow for the "
                            "default CPU job; opt in with on) | on | off")
    policy: PolicyTrainConfig = Field(default_factory=lambda: PolicyTrainConfig(steps=400, batch_size=16),
                                      description="the LeRobot policy trained in both arms (same budget)")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="closed-loop episodes per seed")
    verdict: VerdictConfig = Field(default_factory=VerdictConfig)
    seeds: list[int] = Field([0, 1, 2], min_length=1, description="training seeds per arm (3 or more for an interval "
                                                                  "worth reading)")
    evaluator: str | None = Field(None, description="your own evaluation instead of the built-in simulator "
                                                    "(docs/policy.md): an entry point name or 'module:factory'")

    def comparison(self, device: str) -> PolicyEvalConfig:
        """The core's config of one comparison on `device`."""
        return PolicyEvalConfig(policy=self.policy, rollout=self.rollout, verdict=self.verdict, seeds=self.seeds,
                                device=device, evaluator=self.evaluator)

    def cpu_minutes(self) -> float:
        """About how long the comparison takes on a CPU (both arms, every seed)."""
        train = self.policy.steps * self.policy.batch_size * CPU_SECONDS_PER_SAMPLE
        rollout = self.rollout.episodes * self.rollout.max_steps * CPU_SECONDS_PER_ENV_STEP
        return 2 * len(self.seeds) * (train + rollout) / 60
