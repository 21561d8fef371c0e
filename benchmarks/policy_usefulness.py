"""Does the refreshed dataset train a better policy? Closed-loop measurement on the embedded PushT domain.

    # the committed CPU result (see docs/policy.md for the time it takes)
    nice -n 10 python benchmarks/policy_usefulness.py --iterate-home /tmp/policy-home \\
        --iterate "" --iterate "generate.max_videos=64;generate.seeds=[0,1,2,3]" --name policy-usefulness-cpu

    # the GPU profile (~8 min on one H100: ACT 3000 steps of 64, 3 seeds x 2 arms in 6 processes at once), on the
    # committed refreshed version the CPU result used (datasets/pusht_rotated_refreshed64)
    python benchmarks/policy_usefulness.py --preset gpu --refreshed datasets/pusht_rotated_refreshed64 \\
        --name policy-usefulness-gpu

For every refreshed version (`--refreshed PATH`, or one per `--iterate SETS`: the flywheel's main job run with
those `--set` values, `;`-separated, in `--iterate-home`, its refreshed_dataset taken from its output), the
same LeRobot policy is trained on the real version (`--real`, default datasets/pusht_rotated; trained once
and shared by every comparison) and on the refreshed one, `--seeds` seeds each, and rolled out closed-loop in
gym-pusht through the domain's camera on one start list (flywheel.policy.compare_arms' pieces). Also measured
on that start list: the scripted expert that recorded the real data and an idle agent (what a policy that never
touches the block scores), as anchors; and, per refreshed version, what its synthetic episodes are: how many,
how long, how much goal coverage the simulator replay of their pseudo-actions gains, against real windows of
the same length; and the curation's accept / reject counts and reasons when the curated folder is known.

Writes <out>/<name>.json, <out>/<name>.md, <out>/<name>-contact_sheet.png (rows: real arm's episodes, then
the last refreshed arm's), and every comparison's report.json / episodes.csv / rollouts.mp4 under
<out>/<name>/<label>/. The JSON is rewritten after every trained arm, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from flywheel.policy import compare  # noqa: E402
from flywheel.policy.config import PolicyEvalConfig, cpu_config, gpu_config  # noqa: E402
from flywheel.policy.compare import episode_seeds  # noqa: E402
from flywheel.policy.evaluators import ArmPolicy  # noqa: E402
from flywheel.pusht.evaluator import ScriptedPushTEvaluator  # noqa: E402
from flywheel.pusht.simulator import (  # noqa: E402
    PushTSimulator,
    coverage_of_states,
)

STARTED = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - STARTED:7.0f}s] {msg}", flush=True)


# ── Inputs ───────────────────────────────────────────────────────────────────────────────────────


def run_iteration(home: Path, sets: str) -> dict:
    """The main job with `sets` (`;`-separated key=value); returns its refreshed_dataset and curated folders."""
    cmd = [sys.executable, "-m", "flywheel.cli", "iterate", "--home", str(home)]
    for item in filter(None, (s.strip() for s in sets.split(";"))):
        cmd += ["--set", item]
    log("running " + " ".join(cmd[1:]))
    t0 = time.time()
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the main job failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    found = dict(re.findall(r"^\s+(refreshed_dataset|curated_trajectories)\s+(\S+)\s*$", done.stdout, re.M))
    if "refreshed_dataset" not in found:
        sys.exit(f"no refreshed_dataset path in the main job's output:\n{done.stdout[-3000:]}")
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("[") and "done" in ln]
    return dict(refreshed=found["refreshed_dataset"], curated=found.get("curated_trajectories"), sets=sets,
                iterate_seconds=round(time.time() - t0, 1), stage_lines=lines)


def curation_summary(curated: str | None, real_root: Path | None = None,
                     simulator: PushTSimulator | None = None) -> dict | None:
    """Accepted / rejected counts, the first failing filter of each rejected candidate, and (with the real root
    and its simulator) every candidate's simulator progress, accepted and rejected alike."""
    if not curated or not (Path(curated) / "results.parquet").is_file():
        return None
    table = pd.read_parquet(Path(curated) / "results.parquet")
    reasons = Counter(str(r).split(":")[0] for r in table.loc[~table["accepted"], "reasons"])
    out = dict(path=curated, candidates=len(table), accepted=int(table["accepted"].sum()),
               rejected=int((~table["accepted"]).sum()), rejected_by=dict(reasons.most_common()))
    if real_root is not None and simulator is not None:
        out["simulator_progress"] = candidate_progress(Path(curated), table, real_root, simulator)
    return out


def candidate_progress(curated: Path, results: pd.DataFrame, real_root: Path, simulator: PushTSimulator) -> dict:
    """Per candidate trajectory (accepted or rejected by the filters): replay its pseudo-actions in the simulator
    from its source clip's start state (what the refresh does for the accepted ones: flywheel.stages'
    _simulator_features) and measure task progress, the change of the block's goal coverage from the first to
    the last state. Compared between the filters' accepted and rejected candidates (scipy.stats)."""
    from scipy import stats

    from flywheel.stages import _simulator_features, _synthetic_clips

    labels = Path(json.loads((curated / "curated.json").read_text())["labels"])
    clips, _, _ = _synthetic_clips(labels)
    accepted = results.set_index("clip_id")["accepted"]
    rows = []
    for row in clips.itertuples():
        actions = np.load(labels / row.actions)["actions"]
        features = _simulator_features(real_root, row, actions, float(row.fps))
        if not features:
            continue
        states = np.asarray(features["observation.environment_state"])
        cov = coverage_of_states(simulator, states[[0, -1]])
        block_moved = float(np.linalg.norm(states[-1, 2:4] - states[0, 2:4]))
        rows.append(dict(clip_id=row.request_id, accepted=bool(accepted[row.request_id]),
                         coverage_gain=round(float(cov[1] - cov[0]), 5), block_moved_px=round(block_moved, 2)))
    table = pd.DataFrame(rows)
    out = dict(replayed=len(table), candidates=rows)
    if table.empty:
        return out
    for name, part in (("accepted", table[table.accepted]), ("rejected", table[~table.accepted])):
        if len(part):
            out[name] = dict(coverage_gain=describe(part.coverage_gain), block_moved_px=describe(part.block_moved_px),
                             making_progress=round(float((part.coverage_gain > 0.01).mean()), 4),
                             going_backwards=round(float((part.coverage_gain < -0.01).mean()), 4))
    if table.accepted.nunique() == 2:
        test = stats.mannwhitneyu(table[table.accepted].coverage_gain, table[~table.accepted].coverage_gain)
        r = stats.pointbiserialr(table.accepted.astype(float), table.coverage_gain)
        out["accepted_vs_rejected"] = dict(mann_whitney_p=round(float(test.pvalue), 4),
                                           point_biserial_r=round(float(r.statistic), 4),
                                           point_biserial_p=round(float(r.pvalue), 4))
    return out


def synthetic_summary(root: Path, simulator: PushTSimulator) -> dict:
    """What the synthetic episodes of a refreshed version are, next to its real ones: length, and the goal
    coverage gained along each episode's environment state (for a synthetic episode: the simulator replay of
    its pseudo-actions, as the refresh stored it) against real windows of the same length."""
    frames = pd.concat(pd.read_parquet(p) for p in sorted((root / "data").rglob("*.parquet")))
    if "is_synthetic" not in frames:  # a dataset that was never refreshed: all real
        frames["is_synthetic"] = False
    synthetic, real = [], []
    for _, ep in frames.groupby("episode_index"):
        states = np.stack(ep["observation.environment_state"].to_numpy())
        (synthetic if bool(ep["is_synthetic"].iloc[0]) else real).append(states)
    out = dict(real_episodes=len(real), real_frames=int(sum(len(s) for s in real)),
               synthetic_episodes=len(synthetic), synthetic_frames=int(sum(len(s) for s in synthetic)))
    out["synthetic_frame_fraction"] = round(out["synthetic_frames"] / max(1, out["synthetic_frames"] + out["real_frames"]), 4)
    if not synthetic:
        return out
    length = int(np.median([len(s) for s in synthetic]))

    def gain(states):
        cov = coverage_of_states(simulator, states[[0, -1]])
        return float(cov[1] - cov[0])

    syn_gain = [gain(s) for s in synthetic]
    real_gain = [gain(s[i:i + length]) for s in real for i in range(0, len(s) - length + 1, length)]
    out.update(synthetic_length_median=length, synthetic_coverage_gain=describe(syn_gain),
               real_window_coverage_gain=describe(real_gain),
               synthetic_making_progress=float(np.mean(np.asarray(syn_gain) > 0.01)),
               real_windows_making_progress=float(np.mean(np.asarray(real_gain) > 0.01)))
    return out


def shown_path(path: str) -> str:
    """A path inside the repository as it is written in the repository's commands."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO_ROOT)) if p.is_relative_to(REPO_ROOT) else str(path)


def describe(values) -> dict:
    v = np.asarray(values, float)
    return dict(n=int(v.size), mean=round(float(v.mean()), 4), median=round(float(np.median(v)), 4),
                min=round(float(v.min()), 4), max=round(float(v.max()), 4))


# ── Anchors ──────────────────────────────────────────────────────────────────────────────────────


def anchors(simulator: PushTSimulator, config: PolicyEvalConfig, baseline: dict) -> dict:
    """The scripted expert that recorded the real data, and the evaluator's do-nothing baseline (an agent that
    holds still), on the comparison's start list."""
    seeds = episode_seeds(config.rollout.start_seed, config.rollout.episodes)
    expert = ScriptedPushTEvaluator(simulator, config.rollout.max_steps, config.rollout.batch)
    results = expert.evaluate(ArmPolicy("expert", 0, Path("."), None), seeds)
    mean = lambda key: round(float(np.mean([r.metrics[key] for r in results])), 4)  # noqa: E731
    return dict(scripted_expert=dict(success=mean("success"), coverage=mean("coverage")),
                idle_agent={k: round(v, 4) for k, v in baseline.items()})


# ── Report ───────────────────────────────────────────────────────────────────────────────────────


def fmt_arm(arm: dict) -> str:
    return f"{arm['mean']:.3f} [{arm['low']:.3f}, {arm['high']:.3f}]"


def fmt_diff(d: dict) -> str:
    if d["low"] is None:
        return f"{d['mean']:+.3f} (no interval)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"# Policy usefulness: real vs real + synthetic ({result['environment']['date'][:10]})", "",
        f"Question: does the refreshed dataset train a better policy? Same LeRobot `{c['policy']['type']}` policy "
        f"(inputs {', '.join(c['policy']['input_features'])}; {c['policy']['steps']} steps of batch "
        f"{c['policy']['batch_size']}, lr {c['policy']['lr']}, overrides {c['policy']['overrides'] or 'none'}) trained "
        f"on each version with seeds {c['seeds']}; each run rolled out closed-loop in gym-pusht through the "
        f"domain's camera on the same {c['rollout']['episodes']} starts (at most {c['rollout']['max_steps']} "
        f"steps). Primary metric: `{c['verdict']['primary']}`, margin {c['verdict']['margin']}.", "",
        "| comparison | arm | episodes (synthetic) | success [95% CI] | final coverage [95% CI] | runs (success / coverage per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for comp in result["comparisons"]:
        rep = comp["report"]
        for arm in ("real", "refreshed"):
            ds = rep["datasets"][arm]
            s, cv = rep["metrics"]["success"][arm], rep["metrics"]["coverage"][arm]
            per = ", ".join(f"{a:.2f}/{b:.3f}" for a, b in zip(s["per_seed"], cv["per_seed"]))
            lines.append(f"| {comp['label']} | {arm} | {ds['episodes']} ({ds['synthetic_episodes']}) | {fmt_arm(s)} | "
                         f"{fmt_arm(cv)} | {per} |")
    lines += ["", "| comparison | metric | refreshed - real [95% CI, t over seeds] | p | start-level CI | verdict |",
              "|---|---|---|---|---|---|"]
    for comp in result["comparisons"]:
        for name in ("success", "coverage", "max_coverage", "block_moved"):
            m = comp["report"]["metrics"][name]
            d = m["difference"]
            start = "—" if d["start_low"] is None else f"[{d['start_low']:+.3f}, {d['start_high']:+.3f}]"
            p = "—" if d["p_value"] is None else f"{d['p_value']:.3f}"
            lines.append(f"| {comp['label']} | {name} | {fmt_diff(d)} | {p} | {start} | **{m['verdict']}** |")
    a = result["anchors"]
    lines += ["", f"Anchors on the same starts: the scripted expert that recorded the real data: success "
              f"{a['scripted_expert']['success']:.2f}, final coverage {a['scripted_expert']['coverage']:.3f}; an idle "
              f"agent (never touches the block; the verdict rule's do-nothing baseline): success "
              f"{a['idle_agent']['success']:.2f}, coverage {a['idle_agent']['coverage']:.3f}.", "",
              "## What the synthetic data are", "",
              "| comparison | candidates | accepted | rejected by | synthetic episodes / frames | share of frames | "
              "coverage gain per synthetic episode (sim replay of its pseudo-actions) | per real window of that length |",
              "|---|---|---|---|---|---|---|---|"]
    for comp in result["comparisons"]:
        cur, syn = comp.get("curation") or {}, comp["synthetic"]
        gain = lambda g: f"mean {g['mean']:+.3f}, median {g['median']:+.3f} (n={g['n']})" if g else "—"  # noqa: E731
        lines.append(f"| {comp['label']} | {cur.get('candidates', '—')} | {cur.get('accepted', '—')} | "
                     f"{cur.get('rejected_by', '—')} | {syn['synthetic_episodes']} / {syn['synthetic_frames']} | "
                     f"{syn['synthetic_frame_fraction']:.1%} | {gain(syn.get('synthetic_coverage_gain'))} | "
                     f"{gain(syn.get('real_window_coverage_gain'))} |")
    progress_rows = [(comp["label"], (comp.get("curation") or {}).get("simulator_progress"))
                     for comp in result["comparisons"]]
    if any(p for _, p in progress_rows):
        lines += ["", "Per-trajectory simulator progress of every candidate (its pseudo-actions replayed from its "
                  "source clip's start state; progress = change of the block's goal coverage, first to last state):", "",
                  "| comparison | filters' decision | candidates replayed | coverage gain mean / median [min, max] | "
                  "making progress (> +0.01) | going backwards (< -0.01) | block moved px (mean) |",
                  "|---|---|---|---|---|---|---|"]
        for label, prog in progress_rows:
            for name in ("accepted", "rejected"):
                part = (prog or {}).get(name)
                if part:
                    g = part["coverage_gain"]
                    lines.append(f"| {label} | {name} | {g['n']} | {g['mean']:+.4f} / {g['median']:+.4f} "
                                 f"[{g['min']:+.4f}, {g['max']:+.4f}] | {part['making_progress']:.0%} | "
                                 f"{part['going_backwards']:.0%} | {part['block_moved_px']['mean']:.1f} |")
            test = (prog or {}).get("accepted_vs_rejected")
            if test:
                lines.append(f"| {label} | accepted vs rejected | | Mann-Whitney p = {test['mann_whitney_p']:.3f}; "
                             f"point-biserial r = {test['point_biserial_r']:+.3f} (p = {test['point_biserial_p']:.3f}) "
                             "| | | |")
    env = result["environment"]
    lines += ["", "## Findings", "", *[f"- {f}" for f in result.get("findings", [])], "",
              "## How it was run", "", "```", result["command"],
              *([f"# then the summaries: {result['summaries_by']}"] if result.get("summaries_by") else []), "```", "",
              f"Machine: {env['system']}, {env['cpu_count']} CPUs (shared), torch threads {env['torch_threads']}, "
              f"device {c['device']}{' (' + env['cuda'] + ')' if env['cuda'] else ''}; versions {env['versions']}; "
              f"{result['seconds'] / 60:.0f} min in all. Rule: see docs/policy.md. Per-comparison reports: "
              f"{', '.join(comp['out_dir'] for comp in result['comparisons'])}."]
    return "\n".join(lines) + "\n"


def findings(result: dict) -> list[str]:
    """The measured facts a reader needs to interpret the verdicts, in words (numbers from this run only)."""
    a, out = result["anchors"], []
    for comp in result["comparisons"]:
        m, syn = comp["report"]["metrics"], comp["synthetic"]
        cov = m["coverage"]
        out.append(f"{comp['label']}: {syn['synthetic_episodes']} synthetic episodes, {syn['synthetic_frames']} frames = "
                   f"{syn['synthetic_frame_fraction']:.1%} of the refreshed arm's training frames; final coverage "
                   f"{cov['real']['mean']:.3f} (real) vs {cov['refreshed']['mean']:.3f} (refreshed), difference "
                   f"{fmt_diff(cov['difference'])}: {cov['verdict']}; success {m['success']['real']['mean']:.2f} vs "
                   f"{m['success']['refreshed']['mean']:.2f}: {m['success']['verdict']}.")
        gain = syn.get("synthetic_coverage_gain")
        if gain:
            out.append(f"{comp['label']}: replayed in the simulator, the synthetic episodes' pseudo-actions gain "
                       f"{gain['mean']:+.3f} goal coverage on average ({syn['synthetic_making_progress']:.0%} gain > 0.01); "
                       f"real windows of the same length gain {syn['real_window_coverage_gain']['mean']:+.3f} "
                       f"({syn['real_windows_making_progress']:.0%} > 0.01).")
        prog = (comp.get("curation") or {}).get("simulator_progress") or {}
        if prog.get("accepted") and prog.get("rejected"):
            acc, rej = prog["accepted"], prog["rejected"]
            test = prog.get("accepted_vs_rejected") or {}
            out.append(f"{comp['label']}: per candidate, the simulator replay's coverage gain is "
                       f"{acc['coverage_gain']['mean']:+.4f} for the {acc['coverage_gain']['n']} accepted and "
                       f"{rej['coverage_gain']['mean']:+.4f} for the {rej['coverage_gain']['n']} rejected "
                       f"(Mann-Whitney p {test.get('mann_whitney_p', float('nan')):.3f}): the existing filters' "
                       f"decisions {'do not ' if test.get('mann_whitney_p', 1) >= 0.05 else ''}separate trajectories "
                       f"that make progress from those that do not; {acc['making_progress']:.0%} of accepted and "
                       f"{rej['making_progress']:.0%} of rejected candidates gain > 0.01.")
    if result["comparisons"]:
        real = result["comparisons"][0]["report"]["metrics"]["coverage"]["real"]["mean"]
        out.append(f"Policy budget: the real arm's policies end at coverage {real:.3f}, against {a['idle_agent']['coverage']:.3f} "
                   f"for an idle agent and {a['scripted_expert']['coverage']:.3f} for the expert that made the data.")
    return out


def write(result: dict, out: Path, name: str, timed: bool = True) -> None:
    result["findings"] = findings(result)
    if timed:
        result["seconds"] = round(time.time() - STARTED, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    if result["comparisons"]:
        (out / f"{name}.md").write_text(markdown(result))


# ── Learning curve ───────────────────────────────────────────────────────────────────────────────


def learning_curve(args, config: PolicyEvalConfig, out: Path, name: str) -> int:
    """The real arm's policy (first seed) evaluated on the start list after each step count in --curve: does a
    larger budget of the same policy leave the do-nothing floor?"""
    from flywheel.pusht.evaluator import SimulatorEvaluator
    from flywheel.policy.training import train_policy

    steps = sorted(int(s) for s in args.curve.split(","))
    config = config.model_copy(update=dict(policy=config.policy.model_copy(update=dict(steps=steps[-1]))))
    simulator = PushTSimulator.from_dataset(args.real)
    evaluator = SimulatorEvaluator(simulator, config.rollout)
    seeds = episode_seeds(config.rollout.start_seed, config.rollout.episodes)
    result = dict(command="python " + shlex.join([os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]]),
                  config=config.model_dump(mode="json"), environment=compare.environment(),
                  real=compare.dataset_summary(Path(args.real)), baseline=compare.baseline_of(evaluator, config),
                  curve=[])

    def evaluate(trained) -> None:
        t0 = time.time()
        results = evaluator.evaluate(ArmPolicy("real", trained.seed, Path(args.real), trained), seeds)
        point = dict(train_steps=trained.steps, train_seconds=round(trained.train_seconds, 1),
                     evaluate_seconds=round(time.time() - t0, 1),
                     loss=round(float(np.mean(trained.losses[-50:])), 4),
                     **{k: round(float(np.mean([r.metrics[k] for r in results])), 4) for k in results[0].metrics})
        result["curve"].append(point)
        log(json.dumps(point))
        result["seconds"] = round(time.time() - STARTED, 1)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    train_policy(args.real, config.policy, config.seeds[0], config.device, checkpoints=tuple(steps),
                 on_checkpoint=evaluate)
    base, c = result["baseline"], config.policy
    lines = [f"# Learning curve of the CPU policy ({result['environment']['date'][:10]})", "",
             f"LeRobot `{c.type}` (inputs {', '.join(c.input_features)}; batch {c.batch_size}, lr {c.lr}, overrides "
             f"{c.overrides or 'none'}) trained on {shown_path(result['real']['root'])} ({result['real']['episodes']} episodes, "
             f"{result['real']['frames']} frames), seed {config.seeds[0]}, evaluated closed-loop on "
             f"{config.rollout.episodes} starts after each step count. Do-nothing baseline (an agent that holds "
             f"still) on the same starts: coverage {base['coverage']:.3f}, success {base['success']:.2f}.", "",
             "| training steps | training loss (last 50) | success | final coverage | max coverage | block moved | train s | eval s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p['train_steps']} | {p['loss']:.3f} | {p['success']:.2f} | {p['coverage']:.3f} | {p['max_coverage']:.3f} | "
              f"{p['block_moved']:.2f} | {p['train_seconds']:.0f} | {p['evaluate_seconds']:.0f} |" for p in result["curve"]]
    env = result["environment"]
    lines += ["", "```", result["command"], "```", "",
              f"Machine: {env['system']}, {env['cpu_count']} CPUs (shared), torch threads {env['torch_threads']}; "
              f"versions {env['versions']}; {result['seconds'] / 60:.0f} min in all."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return 0


# ── Arms, one process per (arm, seed) with --jobs ──────────────────────────────────────────────────


def _evaluate_one(arm: str, root: Path, real_root: Path, config: PolicyEvalConfig, seed: int, threads: int):
    """One (arm, seed) in a worker process: its own torch threads, its own simulator envs, the shared device."""
    import torch

    torch.set_num_threads(threads)
    one = config.model_copy(update=dict(seeds=[seed]))
    evaluator = compare.make_evaluator(one, real_root, root)

    def progress(event: dict) -> None:
        if event["stage"] == "policy_eval" or event.get("step") in (1, one.policy.steps) or event["step"] % 500 == 0:
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}))

    return compare.evaluate_arm(arm, root, one, evaluator, progress=progress)


def evaluate_arms(arms: list[tuple[str, Path]], config: PolicyEvalConfig, args, progress) -> list:
    """Every arm for every seed: in this process one after another (--jobs 1), or in --jobs worker processes at
    once (each trains on the shared device and rolls out on its own CPU core); the per-seed results of an arm
    are put back together in seed order, so the statistics see exactly what one process would have made."""
    real_root = Path(args.real)
    jobs = args.jobs or (1 if config.device == "cpu" else len(arms) * len(config.seeds))
    if jobs <= 1:
        evaluator = compare.make_evaluator(config, real_root, arms[-1][1])
        return [compare.evaluate_arm(arm, root, config, evaluator, progress=progress) for arm, root in arms]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(i, seed): pool.submit(_evaluate_one, arm, root, real_root, config, seed, threads)
                   for i, (arm, root) in enumerate(arms) for seed in config.seeds}
        done = {key: future.result() for key, future in futures.items()}
    merged = []
    for i, (arm, root) in enumerate(arms):
        parts = [done[i, seed] for seed in config.seeds]
        merged.append(compare.ArmEvaluation(arm, root, list(config.seeds), parts[0].episode_seeds,
                                            [r for p in parts for r in p.runs], [r for p in parts for r in p.rows],
                                            parts[0].shown))
    return merged


# ── Main ─────────────────────────────────────────────────────────────────────────────────────────


def gpu_quick_config() -> PolicyEvalConfig:
    """The GPU profile meant to finish within ~8 minutes on one H100 with --jobs 6 (every (arm, seed) at once):
    the CPU default's small ACT at 3000 steps of batch 64 (24x the CPU run's samples per seed), 3 seeds, 50
    episodes each. `--preset gpu-full` is flywheel.policy.gpu_config() (diffusion, 20k steps, 5 seeds: hours)."""
    return cpu_config(policy=dict(type="act", steps=3000, batch_size=64, lr=1e-4), seeds=[0, 1, 2], device="cuda")


def build_config(args) -> PolicyEvalConfig:
    config = {"gpu": gpu_quick_config, "gpu-full": gpu_config, "cpu": cpu_config}[args.preset]()
    policy = config.policy.model_dump()
    for key, value in dict(type=args.policy, steps=args.steps, batch_size=args.batch_size, lr=args.lr).items():
        if value is not None:
            policy[key] = value
    if args.input_features:
        policy["input_features"] = args.input_features.split(",")
    if args.policy_override:
        policy["overrides"] = {**policy["overrides"], **json.loads(args.policy_override)}
    rollout_cfg = config.rollout.model_dump()
    for key, value in dict(episodes=args.episodes, max_steps=args.max_steps, batch=args.rollout_batch).items():
        if value is not None:
            rollout_cfg[key] = value
    return PolicyEvalConfig(policy=policy, rollout=rollout_cfg, verdict=config.verdict,
                            seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else config.seeds,
                            device=args.device or config.device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", type=Path, default=REPO_ROOT / "datasets" / "pusht_rotated")
    p.add_argument("--refreshed", type=Path, action="append", default=[], help="a refreshed version (repeatable)")
    p.add_argument("--curated", action="append", default=[], help="its curated_trajectories folder (same order)")
    p.add_argument("--iterate", action="append", default=[],
                   help="run the main job with these ';'-separated --set values and use its refreshed version")
    p.add_argument("--iterate-home", type=Path, default=Path("/tmp/policy-home"))
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    p.add_argument("--name", default=None, help="output file stem (default policy-usefulness-<preset>)")
    p.add_argument("--preset", choices=("cpu", "gpu", "gpu-full"), default="cpu",
                   help="cpu: CPU ACT, 400 steps of 16 | gpu: ~8 min on one H100 (ACT, 3000 steps of 64, all arms and "
                        "seeds in parallel) | gpu-full: diffusion, 20k steps of 64, 5 seeds")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the preset's)")
    p.add_argument("--policy", choices=("act", "diffusion"), default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--policy-override", default=None, help="JSON of extra LeRobot policy-config fields")
    p.add_argument("--input-features", default=None, help="comma-separated dataset features the policy sees")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds")
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--rollout-batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on cpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes, one (arm, seed) each (default: 1 on cpu, every (arm, seed) at once on cuda)")
    p.add_argument("--curve", default=None,
                   help="comma-separated step counts: only the real arm's learning curve (first seed), no comparison")
    p.add_argument("--resummarize", action="store_true",
                   help="recompute the curation / simulator-progress summaries of <out>/<name>.json and rewrite it and "
                        "its .md (no training)")
    args = p.parse_args(argv)

    import torch

    config = build_config(args)
    threads = args.threads or (1 if config.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    name = args.name or f"policy-usefulness-{args.preset}"
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.curve:
        return learning_curve(args, config, out, name)
    if args.resummarize:
        result = json.loads((out / f"{name}.json").read_text())
        simulator = PushTSimulator.from_dataset(args.real)
        for comp, version in zip(result["comparisons"], result["versions"]):
            comp["curation"] = curation_summary(version.get("curated"), args.real, simulator)
        result["summaries_by"] = "python " + shlex.join([os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]])
        write(result, out, name, timed=False)
        log(f"rewrote {out / name}.json and .md")
        return 0
    versions = [dict(refreshed=str(r), curated=(args.curated[i] if i < len(args.curated) else None), sets=None)
                for i, r in enumerate(args.refreshed)]
    versions += [run_iteration(args.iterate_home, sets) for sets in args.iterate]
    if not versions:
        p.error("give --refreshed PATH or --iterate SETS")

    simulator = PushTSimulator.from_dataset(args.real)
    evaluator = compare.make_evaluator(config, args.real, Path(versions[0]["refreshed"]))
    result = dict(command="python " + shlex.join([os.path.relpath(__file__, REPO_ROOT), *sys.argv[1:]]),
                  config=config.model_dump(mode="json"), environment=compare.environment(), versions=versions,
                  comparisons=[])
    log(f"anchors on {config.rollout.episodes} starts")
    baseline = compare.baseline_of(evaluator, config)
    result["anchors"] = anchors(simulator, config, baseline)
    log(f"anchors: {result['anchors']}")
    write(result, out, name)

    def progress(event: dict) -> None:
        if event["stage"] == "policy_eval" or event.get("step") in (1, config.policy.steps) or event["step"] % 100 == 0:
            log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in event.items()}))

    arms = evaluate_arms([("real", Path(args.real))] + [("refreshed", Path(v["refreshed"])) for v in versions],
                         config, args, progress)
    real = arms[0]
    result["real_runs"] = real.runs
    write(result, out, name)
    for i, version in enumerate(versions):
        label = f"v{i + 1}" + (f"[{version['sets']}]" if version.get("sets") else "")
        root = Path(version["refreshed"])
        refreshed = arms[i + 1]
        comp_dir = out / name / f"v{i + 1}"
        comparison = compare.compare_evaluations(real, refreshed, config, evaluator.name, comp_dir,
                                                 baseline=baseline)
        result["comparisons"].append(dict(
            label=label, out_dir=os.path.relpath(comp_dir, out), verdict=comparison.verdict, report=comparison.report,
            synthetic=synthetic_summary(root, simulator),
            curation=curation_summary(version.get("curated"), args.real, simulator)))
        if "contact_sheet" in comparison.paths:
            shutil.copy(comparison.paths["contact_sheet"], out / f"{name}-contact_sheet.png")
        log(f"{label}: verdict {comparison.verdict} ({comparison.metrics[comparison.primary].reason})")
        write(result, out, name)
    write(result, out, name)
    log(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
