"""A whole flywheel iteration, stage after stage, without Dagster (the CLI's `flywheel iterate`).

`run_iterations` turns the wheel several times: each iteration ingests the dataset version the previous
one refreshed (its real episodes keep their ids and split; its synthetic ones go to train).

Each stage is content-addressed, so running again reuses every stage whose inputs did not change;
`until` stops after a given stage (the CLI's per-stage commands). Every stage is logged to MLflow
as a child of the iteration's run; the adapter is registered as a candidate and promoted to
champion only if the evaluation gate passes; synthetic videos come from the domain's champion
(the base model when the domain has none yet).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from flywheel import stages
from flywheel.config import FlywheelConfig
from flywheel.lineage.recorder import IterationLineage
from flywheel.store import atomic_write_bytes, hash_json, resolve_home

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

# The config section each stage reads (logged as the stage run's params).
STAGE_CONFIG = {
    "demonstrations": "ingest",
    "training_clips": "clips",
    "adapter": "train",
    "adapter_evaluation": "evaluate",
    "synthetic_videos": "generate",
    "pseudo_actions": "label",
    "curated_trajectories": "quality",
    "refreshed_dataset": "refresh",
}


def run_iteration(
    config: FlywheelConfig,
    until: str | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[dict], None] | None = None,
) -> dict[str, stages.StageResult]:
    home = resolve_home(config.home)
    wanted = STAGE_ORDER
    if until is not None:
        if until not in STAGE_ORDER:
            raise ValueError(f"unknown stage {until!r}; stages: {', '.join(STAGE_ORDER)}")
        wanted = STAGE_ORDER[: STAGE_ORDER.index(until) + 1]
    lineage = IterationLineage(home, config.domain, config.iteration)
    log(f"[iteration] domain {config.domain}, iteration {lineage.iteration}, MLflow run {lineage.run_id}")
    state = IterationState()
    results: dict[str, stages.StageResult] = {}
    started = time.perf_counter()
    try:
        for name in wanted:
            t0 = time.perf_counter()
            log(f"[{name}] running ...")
            section = getattr(config, STAGE_CONFIG[name])
            step_key = hash_json({"stage": name, "upstream": {k: v.key for k, v in results.items()},
                                  "config": section.model_dump(mode="json"),
                                  "model": config.model.model_dump(mode="json")})[:16]
            with lineage.stage(name, step_key, section) as run:
                result = _run_stage(name, config, home, results, state, lineage, progress)
                _record(name, result, results, state, lineage, run, config)
            results[name] = result
            verdict = "reused" if result.reused else f"done in {time.perf_counter() - t0:.1f}s"
            log(f"[{name}] {verdict}: {result.path}{_headline(name, result)}")
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.finish()
    summary = {
        "domain": config.domain,
        "iteration": lineage.iteration,
        "home": str(home),
        "seconds": round(time.perf_counter() - started, 1),
        "mlflow": lineage.links(),
        "adapter_version": state.adapter_version,
        "generated_with": state.generation_adapter,
        "stages": {k: v.as_dict() for k, v in results.items()},
    }
    out = home / "iterations" / config.domain / f"{lineage.iteration:04d}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    atomic_write_bytes(out, json.dumps(summary, indent=2, default=str).encode())
    log(f"iteration summary: {out}")
    return results


def why_not_build_on(refreshed_metadata: dict) -> str | None:
    """Why the next iteration must not ingest this refreshed version (None: it may).

    A version whose synthetic episodes failed the usefulness gate (they made the held-out real episodes'
    action error worse) would feed the next adapter data known to hurt: the wheel stops there instead.
    """
    if refreshed_metadata.get("usefulness_gate_passed") is False:
        report = refreshed_metadata.get("usefulness_report")
        return ("its synthetic episodes failed the usefulness gate (real+synthetic held-out action error above "
                f"real-only x (1 + tolerance)){f'; see {report}' if report else ''}")
    return None


def run_iterations(
    config: FlywheelConfig,
    count: int,
    log: Callable[[str], None] = print,
    progress: Callable[[dict], None] | None = None,
) -> list[dict[str, stages.StageResult]]:
    """Up to `count` full iterations in a row, each on the dataset version the one before it refreshed;
    stops early when a version must not be built on (`why_not_build_on`)."""
    if count < 1:
        raise ValueError(f"count must be >= 1 iterations, got {count}")
    history: list[dict[str, stages.StageResult]] = []
    for turn in range(count):
        if history:
            refreshed = history[-1]["refreshed_dataset"]
            refused = why_not_build_on(refreshed.metadata)
            if refused:
                log(f"[iterations] stopping after {turn} of {count}: the next iteration would ingest "
                    f"{refreshed.path}, but {refused}")
                break
            config = config.model_copy(deep=True)
            config.ingest.source = str(refreshed.path)
            if config.iteration is not None:
                config.iteration += 1
            log(f"[iterations] {turn + 1}/{count}: ingesting the refreshed version {refreshed.path} "
                f"({refreshed.metadata.get('synthetic_episodes', 0)} synthetic episodes added last time)")
        history.append(run_iteration(config, log=log, progress=progress))
    return history


class IterationState:
    """What later stages need from earlier ones beyond their artifacts (registry versions)."""

    adapter_version: str | None = None
    generation_adapter: str = "base"


def _run_stage(name, config: FlywheelConfig, home, done: dict, state: IterationState, lineage, progress):
    if name == "demonstrations":
        return stages.ingest_stage(home, config.ingest, progress)
    if name == "training_clips":
        return stages.clips_stage(home, done["demonstrations"].path, config.clips, config.model, progress)
    if name == "adapter":
        cache = done["training_clips"].metadata["latent_cache"]
        return stages.train_stage(home, cache, config.train, config.model, progress)
    if name == "adapter_evaluation":
        return stages.evaluate_stage(home, done["adapter"].path, done["training_clips"].path, config.evaluate,
                                     config.model, progress, generate_config=config.generate,
                                     filter_config=config.quality)
    if name == "synthetic_videos":
        champion = lineage.champion()
        if champion is not None:
            state.generation_adapter = f"champion v{champion[0]}"
        adapter_path = champion[1] if champion is not None else None
        return stages.generate_stage(home, adapter_path, done["training_clips"].path, config.generate,
                                     config.model, progress)
    if name == "pseudo_actions":
        return stages.label_stage(home, done["synthetic_videos"].path, done["demonstrations"].path,
                                  config.label, progress)
    if name == "curated_trajectories":
        return stages.curate_stage(home, done["pseudo_actions"].path, done["demonstrations"].path,
                                   config.quality, progress, model=config.model)
    if name == "refreshed_dataset":
        return stages.refresh_stage(home, done["curated_trajectories"].path, done["demonstrations"].path,
                                    config.refresh, progress)
    raise ValueError(name)


def _record(name, result, done, state: IterationState, lineage: IterationLineage, run, config) -> None:
    inputs = [(k, v.key, str(v.path)) for k, v in done.items()
              if k in ("demonstrations", "training_clips", "synthetic_videos")]
    lineage.record(run, result, inputs[-1:] if inputs else [])
    if name == "adapter":
        state.adapter_version = lineage.register_adapter(run, result, done["training_clips"].metadata["latent_cache_key"])
        result.metadata["registered_version"] = state.adapter_version
    elif name == "adapter_evaluation" and state.adapter_version is not None:
        decision = lineage.gate_and_promote(state.adapter_version, result.metadata, config.evaluate)
        result.metadata["gate_passed"] = decision.passed
        result.metadata["gate_reasons"] = "; ".join(decision.reasons)
        run.log_metrics({"gate_passed": float(decision.passed)})
    elif name == "synthetic_videos":
        version = state.generation_adapter.split("v")[-1] if state.generation_adapter != "base" else None
        lineage.record_synthetic(run, result, version, config.model.preset)
    elif name == "refreshed_dataset":
        lineage.record_refreshed(run, result, done["synthetic_videos"].key)


def _headline(name: str, result) -> str:
    m = result.metadata
    if name == "adapter" and "final_loss" in m:
        return f"  (final loss {m['final_loss']:.4f}, registered v{m.get('registered_version')})"
    if name == "adapter_evaluation" and "psnr_gain_db" in m:
        gate = "passed -> champion" if m.get("gate_passed") else f"failed ({m.get('gate_reasons', '')})"
        kept = ""
        if "video_filter_pass_rate_base" in m:
            kept = (f", video filters keep {m['video_filter_pass_rate_base']:.0%} -> "
                    f"{m['video_filter_pass_rate_adapter']:.0%}")
        return (f"  (PSNR {m['psnr_base']:.2f} -> {m['psnr_adapter']:.2f} dB, SSIM {m['ssim_base']:.3f} -> "
                f"{m['ssim_adapter']:.3f}{kept}, gate {gate})")
    if name == "curated_trajectories" and "pass_rate" in m:
        return f"  (accepted {m['accepted']}/{m['clips']}, pass rate {m['pass_rate']:.0%})"
    if name == "refreshed_dataset":
        return f"  (version {m.get('version_id')}: +{m.get('synthetic_episodes', 0)} synthetic episodes)"
    return ""
