"""A whole flywheel iteration, stage after stage, without Dagster (the CLI's `flywheel iterate`).

Each stage is content-addressed, so running again reuses every stage whose inputs did not change;
`until` stops after a given stage (the CLI's per-stage commands).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.store import atomic_write_bytes, resolve_home

STAGE_ORDER = [
    "demonstrations",
    "training_clips",
    "adapter",
    "adapter_evaluation",
    "synthetic_videos",
    "pseudo_actions",
    "curated_trajectories",
    "refreshed_dataset",
]


def available_stages() -> list[str]:
    """The stages whose core code exists in this build (the rest of the graph lands with later issues)."""
    return [name for name in STAGE_ORDER if hasattr(stages, STAGE_FUNCTIONS[name])]


STAGE_FUNCTIONS = {
    "demonstrations": "ingest_stage",
    "training_clips": "clips_stage",
    "adapter": "train_stage",
    "adapter_evaluation": "evaluate_stage",
    "synthetic_videos": "generate_stage",
    "pseudo_actions": "label_stage",
    "curated_trajectories": "curate_stage",
    "refreshed_dataset": "refresh_stage",
}


def run_iteration(
    config: FlywheelConfig,
    until: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, stages.StageResult]:
    home = resolve_home(config.home)
    wanted = available_stages()
    if until is not None:
        if until not in STAGE_ORDER:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGE_ORDER)}")
        if until not in wanted:
            raise ValueError(f"stage {until!r} is not available in this build; available: {', '.join(wanted)}")
        wanted = wanted[: wanted.index(until) + 1]
    results: dict[str, stages.StageResult] = {}
    started = time.perf_counter()
    for name in wanted:
        t0 = time.perf_counter()
        log(f"[{name}] running ...")
        result = _run_stage(name, config, home, results, progress)
        results[name] = result
        state = "reused" if result.reused else f"done in {time.perf_counter() - t0:.1f}s"
        log(f"[{name}] {state}: {result.path}")
    summary = {
        "domain": config.domain,
        "home": str(home),
        "seconds": round(time.perf_counter() - started, 1),
        "stages": {k: v.as_dict() for k, v in results.items()},
    }
    out = home / "iterations" / config.domain / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_bytes(out, json.dumps(summary, indent=2, default=str).encode())
    results_summary_path = out
    log(f"iteration summary: {results_summary_path}")
    return results


def _run_stage(name, config: FlywheelConfig, home: Path, done: dict, progress):
    if name == "demonstrations":
        return stages.ingest_stage(home, config.ingest, progress)
    if name == "training_clips":
        return stages.clips_stage(home, done["demonstrations"].path, config.clips, config.model, progress)
    if name == "adapter":
        cache = done["training_clips"].metadata["latent_cache"]
        return stages.train_stage(home, cache, config.train, config.model, progress)
    if name == "adapter_evaluation":
        return stages.evaluate_stage(home, done["adapter"].path, done["training_clips"].path, config.evaluate,
                                     config.model, progress)
    if name == "synthetic_videos":
        return stages.generate_stage(home, done["adapter"].path, done["training_clips"].path, config.generate,
                                     config.model, progress)
    if name == "pseudo_actions":
        return stages.label_stage(home, done["synthetic_videos"].path, done["demonstrations"].path,
                                  config.label, progress)
    if name == "curated_trajectories":
        return stages.curate_stage(home, done["pseudo_actions"].path, done["demonstrations"].path,
                                   config.quality, progress)
    if name == "refreshed_dataset":
        return stages.refresh_stage(home, done["curated_trajectories"].path, done["demonstrations"].path,
                                    config.refresh, progress)
    raise ValueError(name)
