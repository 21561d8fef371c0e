"""Closed-loop policy evaluation: does the refreshed dataset train a better policy?

Train the same LeRobot policy (ACT or diffusion, LeRobot's own classes) on the iteration's input version and
on its refreshed version, with the same budget and seeds; roll each out in the domain's simulator (PushT,
seen through the domain's camera) or in your own evaluation, on one shared start list; compare with
intervals, the paired difference and a verdict. No Dagster here: `compare_arms` is what the Dagster asset,
the CLI and benchmarks/policy_usefulness.py call. Names are resolved on first use (torch is heavy).
"""

import importlib

_EXPORTS = {
    "PolicyEvalConfig": "flywheel.policy.config",
    "PolicyTrainConfig": "flywheel.policy.config",
    "RolloutConfig": "flywheel.policy.config",
    "VerdictConfig": "flywheel.policy.config",
    "cpu_config": "flywheel.policy.config",
    "gpu_config": "flywheel.policy.config",
    "PolicyComparison": "flywheel.policy.compare",
    "compare_arms": "flywheel.policy.compare",
    "make_evaluator": "flywheel.policy.compare",
    "can_evaluate": "flywheel.policy.compare",
    "evaluate_arm": "flywheel.policy.compare",
    "compare_evaluations": "flywheel.policy.compare",
    "episode_seeds": "flywheel.policy.compare",
    "ArmPolicy": "flywheel.policy.evaluators",
    "EpisodeResult": "flywheel.policy.evaluators",
    "PolicyEvaluator": "flywheel.policy.evaluators",
    "load_evaluator": "flywheel.policy.evaluators",
    "TrainedPolicy": "flywheel.policy.training",
    "train_policy": "flywheel.policy.training",
    "VERDICTS": "flywheel.policy.statistics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.policy' has no attribute {name!r}")
