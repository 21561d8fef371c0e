"""One flywheel iteration through the real orchestration path on a GPU host, timed stage by stage (issue 19).

It launches the Dagster job the way `flywheel iterate` does (`flywheel.defs.launch.launch`: the home's Dagster
instance, the `gpu` pool, the GPU stages as Dagster Pipes subprocesses, FLYWHEEL_GPU_BACKEND=subprocess) on real
Unitree G1 episodes (datasets/g1_pick_bottle, copied into the run folder), every stage from demonstrations to
refreshed_dataset, with short settings: `cosmos-predict2.5-2b-random` (the 2B / 7B / Wan shapes, random weights)
at the recipe shape 93x432x768, 20 LoRA steps (r=32), 2 evaluation and 2 synthetic videos. The gates are opened as
far as their schema allows (random weights fail every quality criterion; the point here is time and memory).

Per stage it records: wall time (Dagster's step start to step end); for a Pipes workload the time before the stage
began in it (Dagster's side, process creation, interpreter + imports + the Pipes handshake), its model loads,
its own work, the time after it (process exit, materialization, decisions, checks, lineage), torch's peak
allocated / reserved GPU memory inside the workload, and the GPU-busy seconds (NVML utilisation sampled every
0.2 s by a thread of this process, over the step's window). From those it computes the orchestration + startup +
load share of the iteration, and extrapolates the iteration to a realistic configuration (48 clips, 1000 steps,
32 videos, the default 16 evaluation videos) on 1 GPU and on N GPUs (FLYWHEEL_GPUS_PER_STEP, at the measured
multi-GPU efficiencies of benchmarks/results/nvidia-h200-x2.json).

    python benchmarks/iteration_gpu.py --out $OUT                    # GPU host, ~8 min on one H100/H200
    python benchmarks/iteration_gpu.py --dry-run --out /tmp/bench     # CPU: the `tiny` preset, same path, ~2 min

Writes <out>/iteration-gpu-<gpu>.json and .md (GPU, versions, date); copy them to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

SCHEMA = "flywheel-iteration-gpu/1"
DATASET = REPO_ROOT / "datasets" / "g1_pick_bottle"
DOMAIN = "g1-bench"
REALISTIC = {"clips": 48, "train_steps": 1000, "videos": 32, "evaluation_videos": 16}  # 4 clips x 2 seeds x 2 models
# Scaling measured on 2 H200s (benchmarks/results/nvidia-h200-x2.json): the per-GPU training step at global batch
# N, and generation fanned out by request (videos per hour 67.1 -> 135.4).
MULTI_GPU_EFFICIENCY = {"train": 0.99, "generate": 1.0}
MULTI_GPU_COUNTS = (2, 4, 8)
GPU_STAGES_MULTI = {"adapter": "train", "synthetic_videos": "generate"}


# --------------------------------------------------------------------------------------------- the run


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", default=None, help="run folder (home + dataset copy); default: a temp dir, removed")
    parser.add_argument("--keep", action="store_true", help="keep the run folder")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the tiny preset: the same path in ~2 minutes")
    parser.add_argument("--preset", default=None, help="default: cosmos-predict2.5-2b-random (tiny with --dry-run)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--videos", type=int, default=2, help="synthetic videos (the evaluation makes 2 more)")
    parser.add_argument("--clips-per-episode", type=int, default=1, help="of the 12 G1 episodes (9 train, 3 val)")
    parser.add_argument("--gpus-per-step", type=int, default=1, help="FLYWHEEL_GPUS_PER_STEP for train/generate")
    parser.add_argument("--strict-adapter-gate", action="store_true",
                        help="a gate no adapter passes (tests the second run that follows a refused adapter)")
    return parser.parse_args(argv)


def run_settings(args, home: Path, source: Path) -> dict:
    """The iteration's config overrides: short, every stage, gates opened as far as their schema lets them."""
    from flywheel.decisions import AdapterGate

    adapter_gate = {"min_psnr_gain_db": 0.0, "max_ssim_drop": 1.0, "max_filter_pass_rate_drop": 1.0,
                    "max_psnr_drop_vs_champion_db": 1000.0}
    if args.strict_adapter_gate:
        adapter_gate["min_psnr_gain_db"] = 1000.0
    elif "enabled" in AdapterGate.model_fields:  # a gate that can be switched off: off (random weights pass by chance)
        adapter_gate["enabled"] = False
    settings = {
        "home": str(home), "domain": DOMAIN,
        "model": {"preset": args.preset, "seed": 0},
        "ingest": {"source": str(source), "val_fraction": 0.25, "test_fraction": 0.0},
        "clips": {"max_clips_per_episode": args.clips_per_episode},
        # the recipe's r=32, so the step is the one benchmarks/cosmos_predict25.py measured; speed settings unset:
        # the training mode is chosen from the free GPU memory
        "train": {"steps": args.train_steps, "rank": 32, "alpha": 32, "checkpoint_every": 1000},
        "evaluate": {"max_clips": 1, "seeds": [0]},
        "generate": {"seeds": [0], "max_videos": args.videos},
        "gates": {"fit": {"enabled": False}, "adapter": adapter_gate,
                  "curation": {"min_pass_rate": 0.0, "max_pass_rate": 1.0}},
    }
    if args.dry_run:
        settings["label"] = {"idm": {"steps": 40, "batch_size": 8}}
        settings["refresh"] = {"usefulness": {"seeds": [0, 1], "idm": {"steps": 20}}}
    return settings


def launch_after_the_adapter_gate(config, first):
    """When the adapter gate (a blocking check of adapter_evaluation) stopped the run, the stages after it in a
    second run of the same job on the same instance, selected without adapter_evaluation (whose check would block
    them again): random weights beat the base model by chance only, and the point here is time and memory.
    The same steps `flywheel.defs.launch.launch` takes, with that selection. None when the run did not stop there."""
    stopped = [c for c in first.failed_checks if c.asset == "adapter_evaluation"]
    if not stopped or "adapter_evaluation" not in first.results:
        return None
    import dagster as dg

    from flywheel.defs.definitions import build_definitions
    from flywheel.defs.instance import flywheel_instance, use_flywheel_instance
    from flywheel.defs.jobs import ITERATION_JOB
    from flywheel.defs.launch import outcome_of, run_config
    from flywheel.defs.resources import FlywheelResource
    from flywheel.pipeline import STAGE_LIST

    home = Path(config.home)
    rest = [s.asset for s in STAGE_LIST][[s.asset for s in STAGE_LIST].index("synthetic_videos"):]
    use_flywheel_instance(home)
    instance = flywheel_instance(home, echo_step_output=False)
    try:
        job = build_definitions(FlywheelResource.from_env()).resolve_job_def(ITERATION_JOB)
        result = job.execute_in_process(
            run_config=run_config(config, home), instance=instance, partition_key=config.domain, raise_on_error=False,
            asset_selection=[dg.AssetKey(a) for a in rest],
            tags={"flywheel/launched_by": "benchmarks/iteration_gpu.py (after the adapter gate)",
                  "flywheel/selection": ",".join(rest)})
        return outcome_of(result, config.domain)
    finally:
        instance.dispose()


class GpuSampler(threading.Thread):
    """NVML utilisation and memory of every visible GPU, sampled every `interval` s (pynvml, which the GPU host has;
    none on a machine without it). `busy_s(t0, t1)`: the seconds in [t0, t1] a kernel was running, summed over GPUs."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval, self.samples, self.handles, self.error = interval, [], [], None
        self.stopped = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as e:  # no NVML (a CPU machine): the figures stay None
            self.error = f"{type(e).__name__}: {e}"

    def run(self):
        while self.handles and not self.stopped.wait(self.interval):
            now = time.time()
            util = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            used = [self.nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
            self.samples.append((now, util, used))

    def stop(self):
        self.stopped.set()

    def busy_s(self, start: float, end: float) -> float | None:
        if not self.handles:
            return None
        busy, last = 0.0, start
        for t, util, _ in self.samples:
            if start < t <= end:
                busy += (t - last) * sum(util) / 100
                last = t
        return round(busy, 2)

    def peak_used_gib(self, start: float, end: float) -> float | None:
        used = [max(u) for t, _, u in self.samples if start <= t <= end]
        return round(max(used) / 2**30, 2) if used else None


def step_windows(home: Path, run_id: str) -> tuple[dict[str, dict], dict]:
    """(per step: start, end, outcome) and (run: start, end) from the run's Dagster event log."""
    from flywheel.defs.instance import flywheel_instance

    instance = flywheel_instance(home)
    try:
        records = instance.all_logs(run_id)
    finally:
        instance.dispose()
    steps: dict[str, dict] = {}
    run: dict[str, float] = {}
    for record in records:
        event = record.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        if kind in ("RUN_START", "PIPELINE_START"):
            run["start"] = record.timestamp
        elif kind in ("RUN_SUCCESS", "RUN_FAILURE", "PIPELINE_SUCCESS", "PIPELINE_FAILURE"):
            run["end"] = record.timestamp
        if not event.step_key:
            continue
        step = steps.setdefault(event.step_key, {})
        if kind == "STEP_START":
            step["start"] = record.timestamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_SKIPPED", "STEP_UP_FOR_RETRY"):
            step["end"], step["outcome"] = record.timestamp, kind
    return steps, run


# ---------------------------------------------------------------------------------------- the figures


def _r(value, digits=2):
    return None if value is None else round(float(value), digits)


def stage_figures(asset: str, window: dict, meta: dict | None, sampler: GpuSampler) -> dict:
    """What one stage spent where (seconds, GiB)."""
    start, end = window.get("start"), window.get("end")
    figures: dict = {"outcome": window.get("outcome"), "wall_s": _r(end - start) if start and end else None}
    if meta is None or start is None or end is None:
        return figures
    figures["reused"] = bool(meta.get("reused"))
    workload = meta.get("workload")
    if isinstance(workload, dict):  # a Pipes workload (flywheel.workloads.entrypoint.workload_measurements)
        process_at = workload.get("process_started_at")
        loads, imports = float(workload.get("model_load_s") or 0), float(workload.get("model_import_s") or 0)
        figures.update(
            pipes=True,
            dagster_before_process_s=_r(process_at - start) if process_at else None,
            process_startup_s=_r(workload.get("startup_s")),
            before_workload_s=_r(workload["run_started_at"] - start),
            model_import_s=_r(imports), model_load_s=_r(loads),
            work_s=_r(workload["run_s"] - loads - imports),
            after_workload_s=_r(end - workload["run_ended_at"]),
            model_loads=workload.get("model_loads"),
            gpu_peak_allocated_gib=workload.get("gpu_peak_allocated_gib"),
            gpu_peak_reserved_gib=workload.get("gpu_peak_reserved_gib"))
    else:  # in the step process: its wall holds its work and Dagster's around it
        figures.update(pipes=False, work_s=figures["wall_s"])
    figures["gpu_busy_s"] = sampler.busy_s(start, end)
    figures["nvml_peak_used_gib"] = sampler.peak_used_gib(start, end)
    for key in ("training_mode", "training_mode_chosen_by", "estimated_step_gib", "free_gpu_gib_at_start",
                "first_step_s", "step_s_median", "steps", "clips", "cache_num_clips", "cache_video_seconds",
                "cache_text_seconds", "videos", "seconds_per_video", "accepted", "synthetic_episodes"):
        if key in meta:
            figures[key] = meta[key]
    return figures


def video_seconds(samples_parquet: Path) -> list[float]:
    """Seconds per generated video (sampling + decode to frames), in generation order."""
    import pandas as pd

    return [float(s) for s in pd.read_parquet(samples_parquet)["seconds"]] if samples_parquet.is_file() else []


def extrapolate(stages: dict, results: dict, fixed_overhead_s: float) -> dict:
    """The iteration at the realistic configuration. Each stage's wall = a fixed part (startup, loads, compile, Dagster,
    what does not grow) + a variable part (per clip, per step, per video: measured, times the realistic count).
    GPU-busy grows with the variable part at the busy rate of the stage's work. On N GPUs the training steps and the
    synthetic videos are divided over the GPUs at the measured efficiencies; the rest runs as on 1 GPU."""
    per_stage = {}
    for asset, f in stages.items():
        if f.get("wall_s") is None or f.get("reused"):
            continue
        meta = results.get(asset, {})
        measured_var, per_item, items, rule = 0.0, None, 0, "fixed: measured as is"
        if asset == "training_clips" and f.get("cache_num_clips"):
            measured_var = f["cache_video_seconds"]
            per_item, items = measured_var / f["cache_num_clips"], REALISTIC["clips"]
            rule = "VAE encode per clip x 48 clips; the rest (clip cutting, text encode, fit) fixed"
        elif asset == "adapter" and f.get("step_s_median"):
            per_item = f["step_s_median"]
            measured_var, items = per_item * (int(f.get("steps") or 1) - 1), REALISTIC["train_steps"] - 1
            rule = "median step x 999 after the first (compile); the rest fixed"
        elif asset in ("adapter_evaluation", "synthetic_videos"):
            table = "generations/samples.parquet" if asset == "adapter_evaluation" else "samples.parquet"
            seconds = video_seconds(Path(meta.get("path", "")) / table)
            if len(seconds) > 1:
                per_item, measured_var = statistics.median(seconds[1:]), sum(seconds[1:])
                key = "evaluation_videos" if asset == "adapter_evaluation" else "videos"
                items = REALISTIC[key] - 1
                rule = f"median video x {items} after the first (compile); the rest fixed"
        realistic_var = per_item * items if per_item is not None else 0.0
        busy_rate = (min(1.0, f["gpu_busy_s"] / f["work_s"]) if f.get("gpu_busy_s") is not None and f.get("work_s")
                     else None)
        per_stage[asset] = {"rule": rule, "fixed_s": _r(f["wall_s"] - measured_var), "per_item_s": _r(per_item, 4),
                            "items": items, "variable_s": _r(realistic_var),
                            "gpu_busy_s": (_r(f["gpu_busy_s"] + (realistic_var - measured_var) * busy_rate)
                                           if busy_rate is not None else None)}
    busy = [e["gpu_busy_s"] for e in per_stage.values() if e["gpu_busy_s"] is not None]
    gpu_busy = sum(busy) if busy else None
    totals = {}
    for gpus in (1, *MULTI_GPU_COUNTS):
        total = sum(e["fixed_s"] + (e["variable_s"] / (gpus * MULTI_GPU_EFFICIENCY[GPU_STAGES_MULTI[a]])
                                    if gpus > 1 and a in GPU_STAGES_MULTI else e["variable_s"])
                    for a, e in per_stage.items())
        totals[f"{gpus}_gpu"] = {"iteration_s": _r(total), "iteration_min": _r(total / 60, 1)}
    return {"config": REALISTIC, "stages": per_stage, "totals": totals, "gpu_busy_s_1_gpu": _r(gpu_busy),
            "fixed_overhead_s": _r(fixed_overhead_s),
            "fixed_overhead_over_gpu_busy": _r(fixed_overhead_s / gpu_busy, 3) if gpu_busy else None,
            "multi_gpu_efficiency": MULTI_GPU_EFFICIENCY,
            "notes": "pseudo_actions, curated_trajectories and refreshed_dataset are taken as measured (their "
                     "per-video part was not separated from their fixed part); with random weights no video passes "
                     "the filters, so the refresh wrote no synthetic episode and ran no usefulness report. The fixed "
                     "overhead (orchestration + process startup + model loads) does not grow with the configuration"}


def overhead_summary(stages: dict, run_wall_s: float, launch_wall_s: float) -> dict:
    """Orchestration + process startup + model loads, against the iteration and its GPU-busy time."""
    steps_wall = sum(f["wall_s"] for f in stages.values() if f.get("wall_s"))
    pipes = [f for f in stages.values() if f.get("pipes")]
    dagster_around_workloads = sum((f.get("dagster_before_process_s") or 0) + (f.get("after_workload_s") or 0)
                                   for f in pipes)
    startup = sum(f.get("process_startup_s") or 0 for f in pipes)
    loads = sum((f.get("model_load_s") or 0) + (f.get("model_import_s") or 0) for f in pipes)
    between_steps = run_wall_s - steps_wall
    launch_setup = launch_wall_s - run_wall_s
    fixed = dagster_around_workloads + startup + loads + between_steps + launch_setup
    busy = [f["gpu_busy_s"] for f in stages.values() if f.get("gpu_busy_s") is not None]
    gpu_busy = sum(busy) if busy else None
    return {"launch_wall_s": _r(launch_wall_s), "run_wall_s": _r(run_wall_s), "launch_setup_s": _r(launch_setup),
            "between_steps_s": _r(between_steps), "dagster_around_workloads_s": _r(dagster_around_workloads),
            "process_startup_s": _r(startup), "model_loads_s": _r(loads), "fixed_s": _r(fixed),
            "fixed_share_of_iteration": _r(fixed / launch_wall_s, 3),
            "gpu_busy_s": _r(gpu_busy), "fixed_over_gpu_busy": _r(fixed / gpu_busy, 3) if gpu_busy else None,
            "cpu_stages_in_step_process_s": _r(sum(f["wall_s"] for f in stages.values()
                                                   if f.get("wall_s") and not f.get("pipes")))}


# ------------------------------------------------------------------------------------------- reporting


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def software() -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "dagster", "dagster-pipes", "mlflow", "lerobot", "av",
                 "numpy", "pandas"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    import torch

    versions.update(cuda=torch.version.cuda, python=platform.python_version(),
                    cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    return versions


def markdown(report: dict) -> str:
    lines = [f"# One flywheel iteration through Dagster: {report['gpu']} ({report['date']})", "",
             f"`{report['command']}` — {report['preset']}, {report['shape']}; {report['settings_note']}; "
             f"{report['runs_note']}.", "",
             "| stage | wall s | before workload s | model load s | work s | after s | GPU busy s | peak alloc / reserved GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for asset, f in report["stages"].items():
        peak = (f"{f.get('gpu_peak_allocated_gib')} / {f.get('gpu_peak_reserved_gib')}"
                if f.get("gpu_peak_allocated_gib") is not None else "")
        loads = "" if f.get("model_load_s") is None else f"{f['model_load_s']} (+{f['model_import_s']} import)"
        lines.append(f"| {asset}{' (Pipes)' if f.get('pipes') else ''} | {f.get('wall_s')} | "
                     f"{f.get('before_workload_s', '')} | {loads} | {f.get('work_s', '')} | {f.get('after_workload_s', '')} | "
                     f"{'' if f.get('gpu_busy_s') is None else f['gpu_busy_s']} | {peak} |")
    o = report["overhead"]
    lines += ["", f"Iteration: {o['launch_wall_s']} s (Dagster run {o['run_wall_s']} s). Fixed costs: "
                  f"{o['fixed_s']} s = launch setup {o['launch_setup_s']} + between steps {o['between_steps_s']} + "
                  f"Dagster around the workloads {o['dagster_around_workloads_s']} + process startup "
                  f"{o['process_startup_s']} + model loads {o['model_loads_s']}: "
                  f"{o['fixed_share_of_iteration']:.1%} of the iteration"
              + (f", {o['fixed_over_gpu_busy']:.1%} of its GPU-busy {o['gpu_busy_s']} s." if o.get("fixed_over_gpu_busy")
                 else ".")]
    train = report["stages"].get("adapter", {})
    if train.get("training_mode"):
        lines += ["", f"Training: mode {train['training_mode']} ({train.get('training_mode_chosen_by')}; estimated "
                      f"{train.get('estimated_step_gib')} GiB above the weights, {train.get('free_gpu_gib_at_start')} GiB "
                      f"free at start), first step {train.get('first_step_s')} s, median step {train.get('step_s_median')} s, "
                      f"stage peak {train.get('gpu_peak_allocated_gib')} GiB allocated."]
    e = report["extrapolation"]
    lines += ["", f"Extrapolated to {e['config']['clips']} clips, {e['config']['train_steps']} steps, "
                  f"{e['config']['videos']} synthetic + {e['config']['evaluation_videos']} evaluation videos:", "",
              "| GPUs | iteration min |", "|---|---|"]
    for key, t in e["totals"].items():
        lines.append(f"| {key.split('_')[0]} | {t['iteration_min']} |")
    if e.get("fixed_overhead_over_gpu_busy") is not None:
        lines += ["", f"GPU-busy at that configuration (1 GPU): {e['gpu_busy_s_1_gpu']} s; the fixed overhead "
                      f"{e['fixed_overhead_s']} s is {e['fixed_overhead_over_gpu_busy']:.1%} of it (goal: <= 5%)."]
    lines += ["", "| stage | rule | fixed s | per item s | items |", "|---|---|---|---|---|"]
    for asset, s in e["stages"].items():
        per_item = "" if s.get("per_item_s") is None else s["per_item_s"]
        lines.append(f"| {asset} | {s['rule']} | {s['fixed_s']} | {per_item} | {s['items'] or ''} |")
    lines += ["", e["notes"] + ".", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.preset = args.preset or ("tiny" if args.dry_run else "cosmos-predict2.5-2b-random")
    # The real path: GPU stages as Pipes subprocesses, one GPU each (FLYWHEEL_GPUS from the machine).
    os.environ["FLYWHEEL_GPU_BACKEND"] = "subprocess"
    os.environ["FLYWHEEL_GPUS_PER_STEP"] = str(args.gpus_per_step)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    if args.dry_run:
        os.environ["FLYWHEEL_GPUS"] = "0"  # the workloads still run as subprocesses, on the CPU
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="flywheel-iteration-"))
    work.mkdir(parents=True, exist_ok=True)
    home, source = work / "home", work / "datasets" / DATASET.name
    if not source.exists():
        shutil.copytree(DATASET, source)
    os.environ["FLYWHEEL_HOME"] = str(home)

    from flywheel.config import load_config
    from flywheel.defs.launch import launch
    from flywheel.defs.terminal import Terminal, install_terminal

    config = load_config(overrides=run_settings(args, home, source))
    sampler = GpuSampler()
    sampler.start()
    terminal = Terminal.on_stderr()
    install_terminal(terminal)
    started_at = time.time()
    try:
        outcomes = [launch(config, launched_by="benchmarks/iteration_gpu.py")]
        after_gate = launch_after_the_adapter_gate(config, outcomes[0])
        if after_gate is not None:
            outcomes.append(after_gate)
    finally:
        install_terminal(None)
        terminal.close()
        sampler.stop()
    launch_wall = time.time() - started_at
    windows, results, run_walls = {}, {}, []
    for outcome in outcomes:
        steps, run = step_windows(home, outcome.run_id)
        windows.update(steps)
        run_walls.append((run["end"] - run["start"]) if {"start", "end"} <= run.keys() else None)
        results.update({name: r.as_metadata() for name, r in outcome.results.items()})
    outcome = outcomes[-1]
    from flywheel.pipeline import STAGE_LIST

    stages = {s.asset: stage_figures(s.asset, windows.get(s.asset, {}), results.get(s.asset), sampler)
              for s in STAGE_LIST if s.asset in windows}
    run_wall = sum(run_walls) if all(run_walls) else launch_wall
    name = gpu_name()
    preset_shape = {"tiny": "17x64x64"}.get(args.preset, "93x432x768")
    report = {
        "schema": SCHEMA, "gpu": name, "gpus_on_host": os.environ.get("FLYWHEEL_GPUS") or None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "platform": platform.platform()}, "software": software(),
        "command": "python benchmarks/iteration_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "shape": preset_shape, "run_ids": [o.run_id for o in outcomes],
        "success": outcome.success and "refreshed_dataset" in results,
        "stopped_by": [o.why() for o in outcomes if not o.success] or None,
        "runs_note": ("one Dagster run" if len(outcomes) == 1 else "two Dagster runs: the adapter gate refused the "
                      "random-weight adapter, so the stages after adapter_evaluation ran in a second run"),
        "settings_note": f"{args.train_steps} train steps (r=32, mode from free memory), 12 G1 episodes x "
                         f"{args.clips_per_episode} clip, 1 evaluation clip (base + adapter), {args.videos} synthetic "
                         f"videos, GPU stages as Pipes subprocesses (gpus per step {args.gpus_per_step})",
        "nvml": sampler.error or f"{len(sampler.samples)} samples",
        "stages": stages,
        "overhead": overhead_summary(stages, run_wall, launch_wall),
    }
    report["extrapolation"] = extrapolate(stages, results, report["overhead"]["fixed_s"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"iteration-gpu-{slug(name)}" + ("-dry-run" if args.dry_run else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / stem}.json and .md" + ("" if report["success"] else f"; stopped: {report['stopped_by']}"))
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["success"] else 1)
