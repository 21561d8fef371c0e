"""The harness every workload runs in: parse arguments, run the stage, report the result.

Under Dagster Pipes (the orchestrator set DAGSTER_PIPES_CONTEXT) progress goes to the Dagster run log
and the result becomes the asset's materialization; standalone, progress is printed and the result is
written to stdout as JSON. Either way the exit code says whether a retry can help (flywheel.workloads.gpu).

Every result also says what the process spent where (`workload_measurements`): when the process started, how long
until the stage began (interpreter, imports, the Pipes handshake), the stage's own time, each model load, and on a
CUDA GPU the peak memory torch allocated and reserved, so a step's fixed costs are measured, not guessed.

Under torchrun (WORLD_SIZE > 1; `train` and `generate` only) every rank joins the process group
(flywheel.train.distributed) and runs the same stage. Rank 0 behaves as above; the other ranks inherit
DAGSTER_PIPES_CONTEXT too but ignore it: they run silently and only print an error if they fail.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.errors import is_expected
from flywheel.stages import PATH_KEYS
from flywheel.workloads.gpu import EXIT_OK, describe_exit, exit_code_for

StageRun = Callable[[str, Path, dict, Callable[[dict], None]], Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from flywheel.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="python -m flywheel.workloads.stage",
                                     description="Run one flywheel stage (standalone or under Dagster Pipes).")
    parser.add_argument("--stage", required=True, choices=sorted(STAGES), help="the stage's asset name")
    parser.add_argument("--home", required=True, help="flywheel home (artifact store root)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-json", help="the stage's inputs and config as a JSON object")
    source.add_argument("--config-file", help="a file holding that JSON object")
    return parser.parse_args(argv)


def load_args(ns: argparse.Namespace) -> dict:
    text = Path(ns.config_file).read_text() if ns.config_file else ns.config_json
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        where = ns.config_file or "--config-json"
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError("the workload config must be a JSON object of inputs and stage config")
    return args


def pipes_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """Typed Pipes metadata: paths as paths, nested values as JSON, the rest inferred."""
    out: dict[str, Any] = {}
    for k, v in meta.items():
        if k in PATH_KEYS and isinstance(v, str):
            out[k] = {"raw_value": v, "type": "path"}
        elif isinstance(v, (dict, list)):
            out[k] = {"raw_value": v, "type": "json"}
        elif v is None:
            out[k] = {"raw_value": None, "type": "null"}
        else:
            out[k] = v
    return out


class ProgressReporter:
    """Turns stage progress dicts into log lines, at most one every `interval` seconds (plus the last)."""

    def __init__(self, emit: Callable[[str], None], interval: float = 2.0, custom: Callable[[dict], None] | None = None):
        self.emit, self.interval, self.custom = emit, interval, custom
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        now = time.monotonic()
        finished = event.get("total") is not None and event.get("done") == event.get("total")
        if not finished and now - self.last < self.interval:
            return
        self.last = now
        self.emit(format_progress(event))
        if self.custom is not None:
            self.custom({"progress": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in event.items()}})


def describe_error(exc: BaseException) -> str:
    """An expected error is its message (it names the file or field); a bug also names its type."""
    return str(exc) if is_expected(exc) else f"{type(exc).__name__}: {exc}"


def format_progress(event: dict) -> str:
    parts = []
    if "done" in event and "total" in event:
        parts.append(f"{event['done']}/{event['total']}")
    for k, v in event.items():
        if k in ("done", "total"):
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def process_started_at() -> float | None:
    """Wall-clock time (epoch seconds) this process was created, to 10 ms: its age from /proc (Linux), so the
    interpreter's own start and every import count. None where /proc is not there."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])  # field 22 of proc(5), counted after the ")" that ends the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


def workload_measurements(run_started_at: float, run_ended_at: float, main_at: float | None = None) -> dict[str, Any]:
    """What this process spent where: epoch times (s; `*_at`), durations (s), model loads, CUDA peaks (GiB).

    The stage's result carries it as one JSON value, `workload` (Dagster rounds float metadata to 4 digits, which
    would turn an epoch time into a day), plus the two peaks at the top level for the asset page."""
    process_at = process_started_at()
    out: dict[str, Any] = {"run_started_at": round(run_started_at, 3), "run_ended_at": round(run_ended_at, 3),
                           "run_s": round(run_ended_at - run_started_at, 3)}
    if process_at is not None:
        out["process_started_at"] = round(process_at, 3)
        out["startup_s"] = round(run_started_at - process_at, 3)  # interpreter + imports + the Pipes handshake
    if main_at is not None:
        out["main_at"] = round(main_at, 3)
    presets = sys.modules.get("flywheel.model.presets")
    loads = presets.model_loads() if presets is not None else []
    out["model_loads"] = loads
    out["model_load_s"] = round(sum(load["load_s"] for load in loads), 3)
    out["model_import_s"] = round(sum(load["import_s"] for load in loads), 3)
    out.update(cuda_memory_peaks())
    return out


def cuda_memory_peaks() -> dict[str, Any]:
    """torch's peak allocated / reserved memory on this process's GPU, when it used one (else nothing)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    device = torch.cuda.current_device()
    gib = 2**30
    return {"gpu_name": torch.cuda.get_device_name(device),
            "gpu_total_gib": round(torch.cuda.get_device_properties(device).total_memory / gib, 2),
            "gpu_peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
            "gpu_peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 2)}


def _measured(run: Callable[[Path, dict, Callable[[dict], None]], Any], main_at: float):
    def run_measured(home: Path, args: dict, progress: Callable[[dict], None]):
        started = time.time()
        result = run(home, args, progress)
        measured = workload_measurements(started, time.time(), main_at)
        result.metadata["workload"] = measured
        result.metadata.update({k: v for k, v in measured.items() if k.startswith("gpu_peak_")})
        return result

    return run_measured


def main(run: StageRun, argv: list[str] | None = None) -> int:
    """Run `run(stage, home, args, progress)` as a process (or as one rank of a torchrun job); the exit code."""
    from flywheel.runtime import configure_threads

    main_at = time.time()
    ns = parse_args(argv)
    workload = ns.stage
    configure_threads()  # OMP_NUM_THREADS if set, else this process's share of the cores it may use
    run = _measured(functools.partial(run, workload), main_at)
    rank = _torchrun_env("RANK", 0)
    if _torchrun_env("WORLD_SIZE", 1) > 1:
        run = _in_process_group(workload, run)
    from dagster_pipes import PipesEnvVarParamsLoader

    if rank != 0:  # the environment (DAGSTER_PIPES_CONTEXT included) is every rank's: only rank 0 reports
        return _main_other_rank(workload, run, ns, rank)
    if PipesEnvVarParamsLoader().is_dagster_pipes_process():
        return _main_under_pipes(workload, run, ns)
    return _main_standalone(workload, run, ns)


def _torchrun_env(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def _in_process_group(workload: str, run: StageRun) -> StageRun:
    """`run` as one rank of a torchrun job: join the process group first, leave it after."""

    def run_as_rank(home: Path, args: dict, progress: Callable[[dict], None]):
        from flywheel.pipeline import STAGES

        if not STAGES[workload].multi_gpu:
            several = ", ".join(s.asset for s in STAGES.values() if s.multi_gpu)
            raise ValueError(f"the {workload} stage runs as one process; start it without torchrun "
                             f"(several GPUs: {several})")
        device = ((args.get("config") or {}).get("model") or {}).get("device")
        if device and str(device).startswith("cuda:"):
            raise ValueError(f"model.device {device!r} would put every rank on one GPU; leave it unset or 'cuda' "
                             "under torchrun (each rank uses cuda:LOCAL_RANK)")
        _die_with_launcher()
        from flywheel.train.distributed import init_world, shutdown_world

        init_world(device)
        result = run(home, args, progress)
        shutdown_world()  # not on error: leaving the group could wait on ranks that are still in a collective
        return result

    return run_as_rank


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own: if torchrun is killed (a cancelled run), the ranks
    must not live on holding their GPUs. Linux: ask for SIGKILL when the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (torchrun spawns from its main thread)


def _main_other_rank(workload: str, run: StageRun, ns: argparse.Namespace, rank: int) -> int:
    """Ranks 1..N-1 of a torchrun job: the same stage, no progress, no result (rank 0 reports both)."""
    try:
        run(Path(ns.home), load_args(ns), lambda event: None)
    except Exception as e:
        code = exit_code_for(e)
        if not is_expected(e):
            traceback.print_exc()
        print(f"[{workload} rank {rank}] {describe_error(e)}\n[{workload} rank {rank}] {describe_exit(code)}",
              file=sys.stderr)
        return code
    return EXIT_OK


def _main_standalone(workload: str, run: StageRun, ns: argparse.Namespace) -> int:
    progress = ProgressReporter(lambda line: print(f"[{workload}] {line}", file=sys.stderr, flush=True))
    try:
        result = run(Path(ns.home), load_args(ns), progress)
    except Exception as e:
        code = exit_code_for(e)
        if not is_expected(e):
            traceback.print_exc()
        print(f"[{workload}] {describe_error(e)}\n[{workload}] {describe_exit(code)}", file=sys.stderr)
        return code
    print(json.dumps(result.as_metadata(), indent=2, default=str))
    return EXIT_OK


def _main_under_pipes(workload: str, run: StageRun, ns: argparse.Namespace) -> int:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        progress = ProgressReporter(pipes.log.info, custom=pipes.report_custom_message)
        processes = _torchrun_env("WORLD_SIZE", 1)
        pipes.log.info(f"{workload} workload started (pid {os.getpid()}"
                       + (f", rank 0 of {processes} processes)" if processes > 1 else ")"))
        try:
            result = run(Path(ns.home), load_args(ns), progress)
        except Exception as e:
            code = exit_code_for(e)
            pipes.log.error(describe_error(e) if is_expected(e) else f"{describe_error(e)}\n{traceback.format_exc()}")
            pipes.report_custom_message({"error": describe_error(e), "expected": is_expected(e), "exit_code": code,
                                         "outcome": describe_exit(code)})
            return code
        meta = result.as_metadata()
        pipes.report_asset_materialization(metadata=pipes_metadata(meta), data_version=result.key)
        pipes.log.info(f"{workload} done: {result.path}{' (reused)' if result.reused else ''}")
    return EXIT_OK
