"""The policy comparison as a step of a flywheel iteration (the policy_evaluation stage, flywheel.stages).

Whether it runs is decided here and recorded either way: `policy.evaluate: off`, `auto` on a machine without
a GPU (a CPU comparison takes tens of minutes: too slow for the default job), a domain without a simulator or
evaluator, or a refreshed version without synthetic episodes (it equals the real data) each give a result
that says "not evaluated" and why, which the build-on decision then reads (flywheel.decisions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.policy.config import PolicyStageConfig


def resolve_device(device: str | None) -> str:
    """The run's `model.device`, else cuda where available, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def why_not_evaluated(config: PolicyStageConfig, device: str, real_root: Path, synthetic_episodes: int) -> str | None:
    """The reason the comparison is skipped (one line a user can act on), or None when it runs."""
    from flywheel.policy.compare import can_evaluate

    if config.evaluate == "off":
        return "policy.evaluate is off"
    if config.evaluate == "auto" and not device.startswith("cuda"):
        return (f"no GPU (policy.evaluate: auto runs it on a GPU only); opt in with --set policy.evaluate=on "
                f"(takes ~{config.cpu_minutes():.0f} min on CPU at this budget: {len(config.seeds)} seeds x 2 arms x "
                f"{config.policy.steps} steps, {config.rollout.episodes} episodes each)")
    if not can_evaluate(real_root, config.comparison(device)):
        return (f"no simulator for this domain ({real_root} was not recorded in one) and no policy.evaluator; the "
                "build-on decision uses the IDM usefulness proxy")
    if synthetic_episodes == 0:
        return "the refreshed version has no synthetic episode: it equals the real data"
    return None


def comparison_metadata(comparison) -> dict[str, Any]:
    """The numbers of a comparison as flat stage metadata (Dagster metadata, MLflow metrics of the child run)."""
    meta: dict[str, Any] = {"evaluated": True, "policy_verdict": comparison.verdict,
                            "policy_primary_metric": comparison.primary,
                            "policy_verdict_reason": comparison.metrics[comparison.primary].reason,
                            "policy_evaluator": comparison.report["evaluator"],
                            "policy_seeds": len(comparison.report["seeds"]),
                            "policy_episodes_per_seed": comparison.report["episodes_per_seed"],
                            "policy_seconds": comparison.report["seconds"]}
    for name, value in comparison.flat_metrics().items():
        if name.split("/")[0] in ("success", "coverage", "verdict_code"):
            meta["policy_" + name.replace("/", "_")] = value
    for name, value in (comparison.report.get("baseline") or {}).items():
        meta[f"policy_idle_{name}"] = value
    return meta
