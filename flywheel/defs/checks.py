"""Quality gates: blocking asset checks. A failed gate stops every downstream asset of the run.

  demonstrations        manifest schema and episode counts (total, train, val)
  adapter               the training loss is finite
  adapter_evaluation    the adapter beats the base model on held-out clips by the configured margin and does not
                        trail the domain's champion by more than allowed (the registry's gate; passing promotes it)
  curated_trajectories  the filter pass rate is within bounds (nothing kept, or nothing filtered, is suspect)
  refreshed_dataset     the new dataset version loads with lerobot's LeRobotDataset, counts matching
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg

DEMONSTRATIONS_CHECK = "schema_and_episode_counts"
ADAPTER_CHECK = "loss_is_finite"
EVALUATION_CHECK = "adapter_beats_base"
CURATION_CHECK = "pass_rate_within_bounds"
REFRESH_CHECK = "loads_with_lerobot"


def spec(asset: str, name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=description)


def demonstrations_check(meta: dict[str, Any], min_episodes: int, min_train_episodes: int,
                         min_val_episodes: int) -> dg.AssetCheckResult:
    from flywheel.data.manifest import MANIFEST_COLUMNS, load_manifest

    problems: list[str] = []
    manifest = load_manifest(meta["path"])
    frame = manifest.frame
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        problems.append(f"manifest columns missing: {missing}")
    else:
        if frame["video_path"].isna().any():
            problems.append("episodes without a video path")
        if (frame["num_frames"] <= 0).any():
            problems.append("episodes with no frames")
        if (frame["fps"] <= 0).any():
            problems.append("episodes with fps <= 0")
        unknown = sorted(set(frame["split"]) - {"train", "val", "test"})
        if unknown:
            problems.append(f"unknown splits {unknown}")
    splits = {s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")} if "split" in frame else {}
    for what, count, least in (("episodes", len(frame), min_episodes),
                               ("train episodes", splits.get("train", 0), min_train_episodes),
                               ("val episodes", splits.get("val", 0), min_val_episodes)):
        if count < least:
            problems.append(f"{count} {what}, the gate wants at least {least}")
    return dg.AssetCheckResult(
        check_name=DEMONSTRATIONS_CHECK, asset_key="demonstrations", passed=not problems,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(problems) or "manifest schema ok, episode counts within the gate",
        metadata={"episodes": len(frame), **{f"{s}_episodes": n for s, n in splits.items()},
                  "min_episodes": min_episodes, "min_train_episodes": min_train_episodes,
                  "min_val_episodes": min_val_episodes},
    )


def adapter_check(meta: dict[str, Any]) -> dg.AssetCheckResult:
    losses = {k: v for k, v in meta.items() if "loss" in k and isinstance(v, (int, float, str))}
    bad = {}
    for k, v in losses.items():
        try:
            if not math.isfinite(float(v)):
                bad[k] = str(v)
        except ValueError:
            bad[k] = str(v)
    return dg.AssetCheckResult(
        check_name=ADAPTER_CHECK, asset_key="adapter", passed=bool(losses) and not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(f"non-finite loss: {bad}" if bad else "no loss reported" if not losses else "loss is finite"),
        metadata={k: (float(v) if k not in bad else str(v)) for k, v in losses.items()},
    )


def evaluation_check(meta: dict[str, Any], decision: Any | None = None) -> dg.AssetCheckResult:
    """The evaluation gate. With `decision` (the registry's GateDecision: vs the base model and the domain's
    champion) the check is that decision, so it passes exactly when the adapter was promoted to champion."""
    passed = bool(meta.get("passed", False)) if decision is None else bool(decision.passed)
    gain, least = meta.get("psnr_gain_db"), meta.get("min_psnr_gain_db")
    verdict = ("adapter accepted" + (" and promoted to champion" if decision is not None else "") if passed
               else "adapter rejected; downstream generation is blocked")
    reasons = f" ({'; '.join(decision.reasons)})" if decision is not None and decision.reasons else ""
    metadata = {k: meta[k] for k in ("psnr_base", "psnr_adapter", "ssim_base", "ssim_adapter", "psnr_gain_db",
                                     "min_psnr_gain_db") if isinstance(meta.get(k), (int, float))}
    if decision is not None:
        metadata["gate_checks"] = dg.MetadataValue.json(decision.checks)
    return dg.AssetCheckResult(
        check_name=EVALUATION_CHECK, asset_key="adapter_evaluation", passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"PSNR gain {gain} dB vs the gate's {least} dB: {verdict}{reasons}",
        metadata=metadata,
    )


def pass_rate(meta: dict[str, Any]) -> float | None:
    if isinstance(meta.get("pass_rate"), (int, float)):
        return float(meta["pass_rate"])
    kept = next((meta[k] for k in ("accepted", "kept", "passed_count") if isinstance(meta.get(k), int)), None)
    total = next((meta[k] for k in ("total", "candidates", "videos") if isinstance(meta.get(k), int)), None)
    return kept / total if kept is not None and total else None


def curation_check(meta: dict[str, Any], min_pass_rate: float, max_pass_rate: float) -> dg.AssetCheckResult:
    rate = pass_rate(meta)
    passed = rate is not None and min_pass_rate <= rate <= max_pass_rate
    return dg.AssetCheckResult(
        check_name=CURATION_CHECK, asset_key="curated_trajectories", passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=("the curation reported no pass rate" if rate is None else
                     f"pass rate {rate:.3f}, bounds [{min_pass_rate}, {max_pass_rate}]"),
        metadata={"pass_rate": rate if rate is not None else -1.0, "min_pass_rate": min_pass_rate,
                  "max_pass_rate": max_pass_rate},
    )


def load_with_lerobot(root: Path) -> dict[str, Any]:
    """Open a dataset version the way a policy trainer would, and read its first and last frame."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = json.loads((root / "meta" / "info.json").read_text())
    dataset = LeRobotDataset(repo_id=info.get("repo_id") or f"flywheel/{root.name}", root=root, video_backend="pyav")
    first, last = dataset[0], dataset[len(dataset) - 1]
    return {"episodes": int(dataset.num_episodes), "frames": int(dataset.num_frames),
            "features": sorted(first.keys()), "last_episode_index": int(last["episode_index"])}


def expected_episodes(meta: dict[str, Any]) -> int | None:
    """Episodes the refresh says it wrote: real + synthetic (or a plain `episodes` count)."""
    if isinstance(meta.get("episodes"), int):
        return meta["episodes"]
    real, synthetic = meta.get("real_episodes"), meta.get("synthetic_episodes")
    return real + synthetic if isinstance(real, int) and isinstance(synthetic, int) else None


def refresh_check(meta: dict[str, Any]) -> dg.AssetCheckResult:
    root = Path(meta.get("dataset_root") or meta["path"])
    base = dict(check_name=REFRESH_CHECK, asset_key="refreshed_dataset", severity=dg.AssetCheckSeverity.ERROR)
    try:
        loaded = load_with_lerobot(root)
    except Exception as e:  # whatever stops LeRobotDataset from loading is what the gate is for
        return dg.AssetCheckResult(**base, passed=False,
                                   description=f"{root}: LeRobotDataset cannot load it: {type(e).__name__}: {e}")
    expected = expected_episodes(meta)
    passed = expected is None or loaded["episodes"] == expected
    return dg.AssetCheckResult(
        **base, passed=passed,
        description=(f"loads: {loaded['episodes']} episodes, {loaded['frames']} frames" if passed else
                     f"loads, but has {loaded['episodes']} episodes where the refresh reported {expected}"),
        metadata={k: v for k, v in loaded.items() if k != "features"},
    )
