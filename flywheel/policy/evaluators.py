"""Who measures a trained policy: the built-in simulator, or your own evaluation (another simulator, a real
robot). Either one returns named metrics per episode, which feed the same report and verdict.

Your own evaluator is any object with

    name: str                 # shown in the report
    needs_policy: bool        # True: flywheel trains the LeRobot policy of each (arm, seed) and hands it over
    def evaluate(self, arm: ArmPolicy, episode_seeds: list[int]) -> list[EpisodeResult]: ...

Optionally also `def baseline(self, episode_seeds) -> dict[str, float]`: what doing nothing scores on those
starts, per metric; a metric whose arms both fail to beat it gets the verdict `inconclusive` (the policies did
not learn the task, so the data were not measured).

`episode_seeds` is the fixed start list, the same for both arms and every training seed: reset your simulator
with them, or map them to your real-robot start configurations, so that both arms face the same starts.
Return one EpisodeResult per seed, in order; its `metrics` are any named numbers (success in {0, 1},
coverage, time to goal, ...). The verdict is taken on `verdict.primary`, which must be one of them.

Register it as the Python entry point `flywheel.policy_evaluators` (name -> factory) or give its import path,
`package.module:factory`, in `policy.evaluator`; the factory is called as
`factory(config=PolicyEvalConfig, dataset_root=Path)` and returns the evaluator. See docs/policy.md.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from flywheel.errors import ConfigError
from flywheel.policy.config import PolicyEvalConfig
from flywheel.policy.training import TrainedPolicy

ENTRY_POINT_GROUP = "flywheel.policy_evaluators"


@dataclass
class ArmPolicy:
    """What an evaluator gets for one (arm, training seed)."""

    arm: str                            # "real" | "refreshed"
    seed: int                           # training seed
    dataset_root: Path                  # the version it was trained on
    policy: TrainedPolicy | None        # the trained LeRobot policy (None when the evaluator does not need one)
    checkpoint_dir: Path | None = None  # the same policy saved in LeRobot's format (from_pretrained), if saved
    keep_frames: int = 0                # how many of the first episodes should return frames (contact sheet)


@dataclass
class EpisodeResult:
    """One evaluated episode: named metrics, and optionally the frames to show."""

    metrics: dict[str, float]
    frames: list[np.ndarray] | None = None
    info: dict = field(default_factory=dict)  # anything else to keep in the report (reset seed, steps, ...)


@runtime_checkable
class PolicyEvaluator(Protocol):
    name: str
    needs_policy: bool

    def evaluate(self, arm: ArmPolicy, episode_seeds: list[int]) -> list[EpisodeResult]: ...


def load_evaluator(spec: str, config: PolicyEvalConfig, dataset_root: Path) -> PolicyEvaluator:
    """The evaluator named by `spec`: an entry point of group `flywheel.policy_evaluators`, or `module:factory`."""
    from pydantic import ValidationError

    factory = _resolve(spec)
    try:
        evaluator = factory(config=config, dataset_root=Path(dataset_root))
    except (TypeError, ValidationError) as e:
        raise ConfigError(f"policy.evaluator {spec!r}: calling it as factory(config=..., dataset_root=...) "
                          f"failed: {e}") from e
    if not isinstance(evaluator, PolicyEvaluator):
        raise ConfigError(f"policy.evaluator {spec!r}: the factory returned {type(evaluator).__name__}, which "
                          "lacks name / needs_policy / evaluate(arm, episode_seeds); see docs/policy.md")
    return evaluator


def _resolve(spec: str) -> Callable:
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if found:
        return found[0].load()
    if ":" not in spec:
        names = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(f"policy.evaluator {spec!r}: no entry point of that name in group {ENTRY_POINT_GROUP!r} "
                          f"(installed: {names}); or give 'package.module:factory'")
    module, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"policy.evaluator {spec!r}: cannot import it ({e}); give 'package.module:factory'") from e
    if not callable(obj):
        raise ConfigError(f"policy.evaluator {spec!r} is not callable; it must be a factory "
                          "(config=..., dataset_root=...) -> evaluator")
    return obj
