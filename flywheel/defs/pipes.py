"""GPU steps (flywheel.pipeline stages with `gpu=True`) run outside the Dagster process, through Dagster Pipes.

`GpuLauncher.run_stage(context, stage, inputs, config, flywheel)` starts `python -m flywheel.workloads.stage
--stage <asset>`:
  subprocess  on this machine (PipesSubprocessClient): one GPU per step (CUDA_VISIBLE_DEVICES from a
              lock per device), logs and progress stream into the run, cancelling the run stops the
              process group (SIGINT, then SIGKILL). Multi-GPU stages (adapter, synthetic_videos) take
              `flywheel.gpus_per_step` GPUs: more than one starts `python -m torch.distributed.run --standalone
              --nproc-per-node N -m flywheel.workloads.stage ...`, one process per GPU, rank 0 talking to Pipes
  k8s         as a Kubernetes pod (PipesK8sClient) requesting `nvidia.com/gpu`, the flywheel home mounted
              from a PersistentVolumeClaim at the same path
  in_process  in the step's own process: no isolation, no device choice (a machine without GPUs, tests)
  auto        (default) subprocess where the machine has GPUs, in_process where it has none: on a CPU a
              stage needs no process of its own, and starting one costs more than the small model's work

How it ended decides what happens next: a transient GPU failure (exit code 75: out of memory, ECC, launch
failure) raises `TransientGpuError`, which the step's retry policy retries; anything else (a config error,
bad input, a bug) is a `Failure` that is not retried, because it would fail the same way again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from dagster._core.errors import DagsterExecutionInterruptedError
from pydantic import Field

from flywheel.config import FlywheelConfig
from flywheel.defs.gpus import gpu_slot
from flywheel.defs.resources import FlywheelResource
from flywheel.errors import FlywheelError
from flywheel.lineage.tracking import ensure_tracking_store, tracking_env
from flywheel.pipeline import Stage
from flywheel.stages import StageResult
from flywheel.workloads.gpu import EXIT_TRANSIENT_GPU, describe_exit, is_transient_gpu_error

REPO_ROOT = Path(__file__).resolve().parents[2]


# Failure metadata key marking an expected error (flywheel.errors): its description is the whole story.
EXPECTED = "flywheel_error"


class TransientGpuError(Exception):
    """A GPU failure a retry can get past (out of memory, ECC, launch failure): the retry policy retries it."""


# Retries only what is worth retrying: everything else is raised as Failure(allow_retries=False).
GPU_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=15, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)


@contextlib.contextmanager
def only_transient_gpu_errors_retry() -> Iterator[None]:
    """Turn every error but TransientGpuError into a non-retryable Failure (config errors fail fast). An
    expected error (flywheel.errors: bad data, bad config, a refused decision) becomes its message alone."""
    try:
        yield
    except (TransientGpuError, dg.Failure):
        raise
    except FlywheelError as e:
        raise dg.Failure(description=str(e), allow_retries=False, metadata={EXPECTED: type(e).__name__}) from None
    except Exception as e:
        if is_transient_gpu_error(f"{type(e).__name__}: {e}"):
            raise TransientGpuError(f"{type(e).__name__}: {e}") from e
        raise dg.Failure(description=f"{type(e).__name__}: {e}", allow_retries=False) from e


class WorkloadExit(Exception):
    def __init__(self, workload: str, code: int, error: str | None, expected: bool = False):
        self.workload, self.code, self.error, self.expected = workload, code, error, expected
        super().__init__(error if expected and error else
                         f"{workload} workload exited with code {code} ({describe_exit(code)})"
                         + (f": {error}" if error else ""))


class GpuPipesSubprocessClient(dg.PipesSubprocessClient):
    """PipesSubprocessClient that runs the workload in its own process group and reports its exit code.

    A cancelled run stops the whole group (the workload and any data-loader workers): SIGINT first so
    it can finish a checkpoint, SIGKILL after `termination_timeout_seconds`.
    """

    def run(self, *, context, extras=None, command: str | Sequence[str], env: Mapping[str, str] | None = None,
            cwd: str | None = None) -> dg.PipesClientCompletedInvocation:
        with dg.open_pipes_session(context=context, context_injector=self.context_injector,
                                   message_reader=self.message_reader, extras=extras) as session:
            process = subprocess.Popen(
                command,
                cwd=cwd or self.cwd,
                env={**os.environ, **self.env, **(env or {}), **session.get_bootstrap_env_vars()},
                start_new_session=True,
            )
            try:
                process.wait()
            except (DagsterExecutionInterruptedError, KeyboardInterrupt):
                context.log.info(f"[pipes] run interrupted: stopping workload process group {process.pid}")
                stop_process_group(process, self.termination_timeout_seconds)
                raise
        invocation = dg.PipesClientCompletedInvocation(session)
        if process.returncode != 0:
            reports = [m for m in session.get_custom_messages() if isinstance(m, dict) and m.get("error")]
            # The workload's own exit code: under torchrun the process's code is torchrun's (1 for any failure),
            # but whether a retry helps (75) or not (78) is what rank 0 reported.
            code = reports[-1].get("exit_code", process.returncode) if reports else process.returncode
            raise WorkloadExit((extras or {}).get("workload", "workload"), code,
                               reports[-1]["error"] if reports else None,
                               bool(reports[-1].get("expected")) if reports else False)
        return invocation


def stop_process_group(process: subprocess.Popen, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def k8s_pod_spec(home: str, gpus_per_pod: int, volume_claim: str, service_account: str = "") -> dict[str, Any]:
    """The pod spec of a GPU workload: GPU limits, and the flywheel home mounted at the same path."""
    container: dict[str, Any] = {"resources": {"limits": {"nvidia.com/gpu": gpus_per_pod}} if gpus_per_pod else {}}
    spec: dict[str, Any] = {"containers": [container], "restart_policy": "Never"}
    if volume_claim:
        container["volume_mounts"] = [{"name": "flywheel-home", "mount_path": home}]
        spec["volumes"] = [{"name": "flywheel-home", "persistent_volume_claim": {"claim_name": volume_claim}}]
    if service_account:
        spec["service_account_name"] = service_account
    return spec


def workload_command(python: str, stage: str, home: str, args: dict, processes: int = 1,
                     config_file: Path | None = None) -> list[str]:
    """`python -m flywheel.workloads.stage --stage <asset> ...`, or under torchrun for several processes. With
    `config_file` (holding `args` as JSON) the arguments go through it: the inputs' metadata carries the upstream
    preview images (~250 KB), more than one command-line argument may hold (Linux: 128 KiB)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] if processes > 1 else []
    source = (["--config-file", str(config_file)] if config_file is not None else
              ["--config-json", json.dumps(args, sort_keys=True, default=str)])
    return [python, *launcher, "-m", "flywheel.workloads.stage", "--stage", stage, "--home", home, *source]


def processes_for(stage: Stage, flywheel: FlywheelResource) -> int:
    """How many processes (GPUs) a stage runs as: gpus_per_step for the multi-GPU stages, else one."""
    return flywheel.step_gpu_count if stage.multi_gpu else 1


def _raw(value: Any) -> Any:
    return value.value if isinstance(value, dg.MetadataValue) else value


class GpuLauncher(dg.ConfigurableResource):
    """Where GPU stages run: a local subprocess, a Kubernetes pod, or in the step process (auto: by machine)."""

    backend: Literal["auto", "subprocess", "k8s", "in_process"] = Field(
        "auto", description="auto: subprocess where the machine has GPUs, in_process where it has none; subprocess: "
                            "a Pipes process on this machine; k8s: a pod per step; in_process: no isolation")
    python: str = Field("", description="python of the workload subprocess; '' = the one running Dagster")
    termination_timeout_s: float = Field(20.0, gt=0, description="SIGINT -> SIGKILL grace period on cancel")
    k8s_image: str = Field("", description="image with flywheel installed (k8s backend)")
    k8s_namespace: str = Field("", description="'' = the current namespace (or 'default')")
    k8s_gpus_per_pod: int = Field(1, ge=0, description="nvidia.com/gpu limit of each workload pod")
    k8s_volume_claim: str = Field("", description="PersistentVolumeClaim holding the flywheel home; mounted at the home path")
    k8s_service_account: str = Field("", description="service account of the workload pods")

    def resolved_backend(self, flywheel: FlywheelResource) -> str:
        if self.backend != "auto":
            return self.backend
        return "subprocess" if flywheel.gpu_count > 0 else "in_process"

    def run_stage(self, context: dg.AssetExecutionContext, stage: Stage, inputs: dict[str, StageResult],
                  config: FlywheelConfig, flywheel: FlywheelResource, progress=None) -> StageResult:
        """Run a GPU stage where the backend says, and return its result."""
        home = str(flywheel.home_path)
        ensure_tracking_store(home)  # created once, under a lock, before the workload (or a parallel step) writes
        processes = processes_for(stage, flywheel)
        backend = self.resolved_backend(flywheel)
        if backend == "in_process":
            if processes > 1:
                context.log.warning(f"gpu backend in_process runs {stage.asset} as one process; "
                                    f"gpus_per_step={processes} needs the subprocess or k8s backend")
            return stage.run(flywheel.home_path, inputs, config, progress)
        args = {"inputs": {name: result.as_metadata() for name, result in inputs.items()},
                "config": config.model_dump(mode="json")}
        try:
            if backend == "k8s":
                invocation = self._run_k8s(context, stage.asset, home, args, processes)
            else:
                invocation = self._run_subprocess(context, stage.asset, home, args, flywheel.gpu_count, processes)
        except WorkloadExit as e:
            if e.code == EXIT_TRANSIENT_GPU:
                raise TransientGpuError(str(e)) from e
            description = e.error if e.expected and e.error else str(e)
            metadata = {"exit_code": e.code, "outcome": describe_exit(e.code)} | ({EXPECTED: "workload"} if e.expected else {})
            raise dg.Failure(description=description, allow_retries=False, metadata=metadata) from None
        result = invocation.get_materialize_result()
        return StageResult.from_metadata({k: _raw(v) for k, v in (result.metadata or {}).items()})

    def _run_subprocess(self, context, workload: str, home: str, args: dict, gpus: int, processes: int = 1):
        client = GpuPipesSubprocessClient(forward_termination=True, termination_timeout_seconds=self.termination_timeout_s)
        args_file = Path(home) / "dagster" / "workload-args" / f"{context.run_id}-{workload}.json"
        args_file.parent.mkdir(parents=True, exist_ok=True)
        args_file.write_text(json.dumps(args, sort_keys=True, default=str))
        command = workload_command(self.python or sys.executable, workload, home, args, processes, args_file)
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        with gpu_slot(Path(home) / "dagster" / "gpu-locks", gpus, log=context.log.info, count=processes) as device:
            where = (f"GPU{'s' if ',' in device else ''} {device}" if device else "CPU")
            how = (f"torchrun, {processes} processes: " if processes > 1 else "") + f"python -m flywheel.workloads.stage"
            context.log.info(f"running {workload} on {where}: {how}")
            env = {**tracking_env(home), "CUDA_VISIBLE_DEVICES": device, "FLYWHEEL_HOME": home, "PYTHONPATH": pythonpath}
            try:
                return client.run(context=context, command=command, env=env, extras={"workload": workload})
            finally:
                args_file.unlink(missing_ok=True)

    def _run_k8s(self, context, workload: str, home: str, args: dict, processes: int = 1):
        from dagster_k8s import PipesK8sClient

        if not self.k8s_image:
            raise FlywheelError("gpu launcher backend 'k8s' needs k8s_image (an image with flywheel installed): set "
                                "FLYWHEEL_K8S_IMAGE")
        client = PipesK8sClient()
        try:
            return client.run(
                context=context,
                image=self.k8s_image,
                command=workload_command("python", workload, home, args, processes),
                namespace=self.k8s_namespace or None,
                env={**tracking_env(home), "FLYWHEEL_HOME": home},
                base_pod_spec=k8s_pod_spec(home, max(self.k8s_gpus_per_pod, processes), self.k8s_volume_claim,
                                           self.k8s_service_account),
                extras={"workload": workload},
            )
        except dg.DagsterError as e:
            code = EXIT_TRANSIENT_GPU if is_transient_gpu_error(str(e)) else 1
            raise WorkloadExit(workload, code, str(e)) from e
