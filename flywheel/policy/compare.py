"""Does the refreshed dataset train a better policy? Two arms, one budget, the same starts.

Arm `real` is the iteration's input version, arm `refreshed` the version with the accepted synthetic episodes.
For every training seed, the same LeRobot policy (type, shape, steps, batch, optimizer) is trained on each
arm and evaluated on the same start list; the per-episode metrics go through flywheel.policy.statistics
(intervals, paired difference, verdict). Outputs, when `out_dir` is given: report.json, episodes.csv, a
contact sheet (contact_sheet.png) and a side-by-side rollout video (rollouts.mp4) of the first episodes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.errors import DataError
from flywheel.policy import statistics
from flywheel.policy.config import PolicyEvalConfig
from flywheel.policy.evaluators import ArmPolicy, EpisodeResult, PolicyEvaluator, load_evaluator
from flywheel.policy.training import train_policy
from flywheel.store import atomic_write_bytes

ARMS = ("real", "refreshed")


@dataclass
class PolicyComparison:
    verdict: str                                  # the primary metric's verdict
    primary: str
    metrics: dict[str, statistics.MetricComparison]
    episodes: pd.DataFrame                        # one row per (arm, seed, episode)
    runs: list[dict]                              # one per (arm, seed): training summary, timings
    report: dict                                  # everything above as JSON, plus config, datasets, versions
    paths: dict[str, Path] = field(default_factory=dict)

    def metric(self, name: str) -> statistics.MetricComparison:
        return self.metrics[name]

    def flat_metrics(self) -> dict[str, float]:
        """Every number of the comparison under a flat name (e.g. for MLflow): `<metric>/<arm>/mean|low|high`,
        `<metric>/difference/mean|low|high|p_value`, `verdict_code` (index in statistics.VERDICTS)."""
        out: dict[str, float] = {"verdict_code": float(statistics.VERDICTS.index(self.verdict))}
        for name, m in self.metrics.items():
            for arm in ("real", "refreshed"):
                stats_ = getattr(m, arm)
                out.update({f"{name}/{arm}/mean": stats_.mean, f"{name}/{arm}/low": stats_.low,
                            f"{name}/{arm}/high": stats_.high})
            d = m.difference
            out.update({f"{name}/difference/{k}": v for k, v in
                        dict(mean=d.mean, low=d.low, high=d.high, p_value=d.p_value).items() if v is not None})
        return out


def dataset_summary(root: Path) -> dict:
    """Episodes and frames of a version, and how many of its episodes are synthetic (from its provenance)."""
    from flywheel.refresh.provenance import read_provenance

    info = json.loads((root / "meta" / "info.json").read_text())
    prov = read_provenance(root)
    synthetic = int(prov["is_synthetic"].sum()) if prov is not None and "is_synthetic" in prov else 0
    return dict(root=str(root), episodes=int(info["total_episodes"]), frames=int(info["total_frames"]),
                synthetic_episodes=synthetic, real_episodes=int(info["total_episodes"]) - synthetic)


def episode_seeds(start_seed: int, episodes: int) -> list[int]:
    """The shared start list's reset seeds: a pure function of (start_seed, i), so a longer list extends a
    shorter one (the PushT sample draws its own episodes' seeds the same way)."""
    return [int(np.random.SeedSequence([start_seed, i]).generate_state(1)[0]) for i in range(episodes)]


def can_evaluate(real_root: str | Path, config: PolicyEvalConfig | None = None) -> bool:
    """Whether closed-loop evaluation is available for this domain: an evaluator is configured, or the dataset
    was recorded in a known simulator. Where not, a gate falls back to the IDM proxy (flywheel.refresh)."""
    from flywheel.simulation import simulation_for

    return bool(config is not None and config.evaluator) or simulation_for(real_root) is not None


def make_evaluator(config: PolicyEvalConfig, real_root: Path, refreshed_root: Path) -> PolicyEvaluator:
    """Your evaluator if `config.evaluator` names one, else the simulator both versions were recorded in."""
    if config.evaluator:
        return load_evaluator(config.evaluator, config, real_root)
    from flywheel.simulation import simulation_for

    simulation = simulation_for(real_root)
    if simulation is None:
        raise DataError(f"{real_root}: not recorded in a known simulator (flywheel.simulation) and no policy.evaluator "
                        "is set; closed-loop evaluation needs one of them (see docs/policy.md)")
    evaluator = simulation.policy_evaluator(Path(real_root), config.rollout)
    other = simulation_for(refreshed_root)
    other_name = other.policy_evaluator(Path(refreshed_root), config.rollout).name if other else "no simulator"
    if other_name != evaluator.name:
        raise DataError(f"{refreshed_root}: recorded in {other_name}, but {real_root} in {evaluator.name}; both arms must be "
                        "the same domain (pass the version this one was refreshed from)")
    return evaluator


@dataclass
class ArmEvaluation:
    """One arm, every training seed: per-run summaries, per-episode metric rows, frames to show."""

    arm: str
    dataset_root: Path
    seeds: list[int]
    episode_seeds: list[int]
    runs: list[dict]
    rows: list[dict]
    shown: list[list[np.ndarray]]      # the first seed's kept episodes (camera frames)


def evaluate_arm(arm: str, dataset_root: str | Path, config: PolicyEvalConfig, evaluator: PolicyEvaluator,
                 out_dir: str | Path | None = None, progress: Callable[[dict], None] | None = None,
                 save_policies: bool = False) -> ArmEvaluation:
    """Train (if the evaluator needs a policy) and evaluate one arm for every seed in `config.seeds`, on the
    start list of `config.rollout`. Both arms of a comparison must come from the same config and evaluator."""
    root = Path(dataset_root)
    if not (root / "meta" / "info.json").is_file():
        raise DataError(f"{root}: the {arm} arm's dataset is not a LeRobot dataset (no meta/info.json)")
    seeds_list = episode_seeds(config.rollout.start_seed, config.rollout.episodes)
    out = Path(out_dir) if out_dir is not None else None
    runs, rows, shown = [], [], []
    for seed in config.seeds:
        run, results = _run_arm(arm, seed, root, config, evaluator, seeds_list, out, save_policies, progress)
        runs.append(run)
        rows += [dict(arm=arm, seed=seed, episode=i, episode_seed=s, **r.metrics)
                 for i, (s, r) in enumerate(zip(seeds_list, results))]
        if seed == config.seeds[0]:
            shown = [r.frames for r in results if r.frames]
    return ArmEvaluation(arm, root, list(config.seeds), seeds_list, runs, rows, shown)


def baseline_of(evaluator: PolicyEvaluator, config: PolicyEvalConfig) -> dict[str, float]:
    """The evaluator's do-nothing baseline on the config's start list ({} if it has none)."""
    if not hasattr(evaluator, "baseline"):
        return {}
    return dict(evaluator.baseline(episode_seeds(config.rollout.start_seed, config.rollout.episodes)))


def compare_evaluations(real: ArmEvaluation, refreshed: ArmEvaluation, config: PolicyEvalConfig,
                        evaluator_name: str, out_dir: str | Path | None = None, seconds: float | None = None,
                        baseline: dict[str, float] | None = None) -> PolicyComparison:
    """The statistics, verdict and outputs of two evaluated arms (same seeds, same start list); `baseline`:
    the evaluator's do-nothing scores (baseline_of), which the verdict rule uses where known."""
    if real.seeds != refreshed.seeds or real.episode_seeds != refreshed.episode_seeds:
        raise ValueError("the arms were evaluated on different seeds or starts; evaluate both with one config")
    episodes = pd.DataFrame(real.rows + refreshed.rows)
    baseline = baseline or {}
    metrics = _compare_metrics(episodes, config, baseline)
    primary = config.verdict.primary
    if primary not in metrics:
        raise DataError(f"verdict.primary {primary!r}: the evaluator {evaluator_name} reported {sorted(metrics)}; "
                        "set verdict.primary to one of them")
    roots = {"real": real.dataset_root, "refreshed": refreshed.dataset_root}
    report = _report(config, roots, evaluator_name, real.episode_seeds, real.runs + refreshed.runs, metrics,
                     primary, seconds)
    report["baseline"] = baseline
    comparison = PolicyComparison(metrics[primary].verdict, primary, metrics, episodes, real.runs + refreshed.runs,
                                  report)
    if out_dir is not None:
        comparison.paths = _write_outputs(Path(out_dir), comparison, {"real": real.shown, "refreshed": refreshed.shown})
    return comparison


def compare_arms(real_root: str | Path, refreshed_root: str | Path, config: PolicyEvalConfig | None = None,
                 out_dir: str | Path | None = None, evaluator: PolicyEvaluator | None = None,
                 progress: Callable[[dict], None] | None = None, save_policies: bool = False) -> PolicyComparison:
    """Train and evaluate both arms for every seed in `config.seeds`; compare. `evaluator` overrides
    `config.evaluator` and the built-in simulator. With `out_dir`: report.json, episodes.csv, contact_sheet.png,
    rollouts.mp4 there; `save_policies` also writes each trained policy to out_dir/policies/<arm>-seed<seed>
    (LeRobot format)."""
    config = config or PolicyEvalConfig()
    started = time.perf_counter()
    evaluator = evaluator or make_evaluator(config, Path(real_root), Path(refreshed_root))
    arms = [evaluate_arm(arm, root, config, evaluator, out_dir, progress, save_policies)
            for arm, root in zip(ARMS, (real_root, refreshed_root))]
    return compare_evaluations(*arms, config, evaluator.name, out_dir, time.perf_counter() - started,
                               baseline_of(evaluator, config))


def _run_arm(arm, seed, root, config, evaluator, seeds_list, out, save_policies, progress):
    run = dict(arm=arm, seed=seed, dataset_root=str(root), episodes=len(seeds_list))
    trained, checkpoint = None, None
    if evaluator.needs_policy:
        report = None if progress is None else (lambda e: progress({**e, "arm": arm, "seed": seed}))
        trained = train_policy(root, config.policy, seed, config.device, report)
        run["train"] = trained.summary()
        if save_policies and out is not None:
            checkpoint = trained.save(out / "policies" / f"{arm}-seed{seed}")
    keep = config.rollout.video_episodes if seed == config.seeds[0] else 0
    t0 = time.perf_counter()
    results = evaluator.evaluate(ArmPolicy(arm, seed, root, trained, checkpoint, keep), list(seeds_list))
    run["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
    _check_results(results, seeds_list, evaluator, arm, seed)
    run["means"] = {k: float(np.mean([r.metrics[k] for r in results])) for k in results[0].metrics}
    if progress is not None:
        progress(dict(stage="policy_eval", arm=arm, seed=seed, **run["means"]))
    return run, results


def _check_results(results: list[EpisodeResult], seeds_list, evaluator, arm, seed) -> None:
    where = f"evaluator {evaluator.name} (arm {arm}, seed {seed})"
    if len(results) != len(seeds_list):
        raise DataError(f"{where} returned {len(results)} episodes for {len(seeds_list)} starts; one per start")
    names = set(results[0].metrics)
    for i, r in enumerate(results):
        if set(r.metrics) != names:
            raise DataError(f"{where}: episode {i} reports {sorted(r.metrics)}, episode 0 {sorted(names)}")
        if not all(np.isfinite(float(v)) for v in r.metrics.values()):
            raise DataError(f"{where}: episode {i} has a non-finite metric {r.metrics}")


def _compare_metrics(episodes: pd.DataFrame, config: PolicyEvalConfig,
                     baseline: dict[str, float]) -> dict[str, statistics.MetricComparison]:
    names = [c for c in episodes.columns if c not in ("arm", "seed", "episode", "episode_seed")]
    out = {}
    for name in names:
        table = {arm: episodes[episodes.arm == arm].pivot(index="seed", columns="episode", values=name)
                 .loc[config.seeds].to_numpy(float) for arm in ARMS}
        out[name] = statistics.compare_metric(name, table["real"], table["refreshed"], config.verdict.margin,
                                              config.verdict.confidence,
                                              higher_is_better=name not in config.verdict.lower_is_better,
                                              baseline=baseline.get(name))
    return out


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    return dict(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor() or None, system=platform.platform(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                versions={p: _package_version(p) for p in ("lerobot", "torch", "gym-pusht", "scipy", "numpy")})


def _report(config, roots, evaluator_name, seeds_list, runs, metrics, primary, seconds) -> dict:
    return dict(
        question="does the refreshed dataset train a better policy than the real one, same budget?",
        verdict=metrics[primary].verdict, primary_metric=primary, verdict_reason=metrics[primary].reason,
        rule=statistics.__doc__.strip(),
        evaluator=evaluator_name,
        datasets={arm: dataset_summary(root) for arm, root in roots.items()},
        seeds=list(config.seeds), episode_seeds=list(seeds_list), episodes_per_seed=len(seeds_list),
        metrics={k: m.to_dict() for k, m in metrics.items()},
        runs=runs, config=config.model_dump(mode="json"), seconds=None if seconds is None else round(seconds, 1),
        environment=environment(),
    )


def _write_outputs(out: Path, comparison: PolicyComparison, shown: dict[str, list]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(report=out / "report.json", episodes=out / "episodes.csv")
    atomic_write_bytes(paths["report"], (json.dumps(comparison.report, indent=2) + "\n").encode())
    atomic_write_bytes(paths["episodes"], comparison.episodes.to_csv(index=False).encode())
    if all(shown.get(arm) for arm in ARMS):
        paths["contact_sheet"] = write_contact_sheet(out / "contact_sheet.png", shown)
        paths["video"] = write_rollout_video(out / "rollouts.mp4", shown)
    return paths


def write_contact_sheet(path: Path, shown: dict[str, list], columns: int = 8) -> Path:
    """One row per shown episode (real first, then refreshed), labelled: `columns` evenly spaced frames."""
    from flywheel.preview import contact_sheet

    videos = [np.asarray(frames) for arm in ARMS for frames in shown[arm]]
    labels = [f"{arm} episode {i}" for arm in ARMS for i in range(len(shown[arm]))]
    return contact_sheet(videos, labels, path, frames_per_video=columns, scale=1.0)


def write_rollout_video(path: Path, shown: dict[str, list], fps: int = 10) -> Path:
    """The shown episodes side by side, real | refreshed, one pair after another (finished ones hold their
    last frame until both end)."""
    from flywheel.data.video import write_video

    clips = []
    for real, refreshed in zip(shown["real"], shown["refreshed"]):
        n = max(len(real), len(refreshed))
        pad = lambda f: list(f) + [f[-1]] * (n - len(f))  # noqa: E731
        gap = np.zeros_like(real[0][:, :4])
        clips += [np.concatenate([a, gap, b], axis=1) for a, b in zip(pad(real), pad(refreshed))]
    frames = np.stack(clips)
    if frames.shape[2] % 2:  # H.264 (yuv420p) wants even sizes
        frames = np.pad(frames, ((0, 0), (0, 0), (0, 1), (0, 0)))
    write_video(path, frames, fps=fps)
    return path
