"""The Dagster definitions of the flywheel: assets, gates, the iteration job, schedule, sensor, resources.

Loaded by `dagster dev -w workspace.yaml` (workspace.yaml at the repository root). The executor is chosen
by FLYWHEEL_EXECUTOR: `multiprocess` (default: one process per step; pass `execution: config: in_process: {}`
in the Launchpad for a single process) or `k8s` (dagster-k8s `k8s_job_executor`, a pod per step; see
docs/dagster.md for Postgres storage and the run launcher). GPU stages: FLYWHEEL_GPU_BACKEND
(`auto` | `subprocess` | `k8s` | `in_process`) and the FLYWHEEL_K8S_* settings of `GpuLauncher`.
"""

import os

import dagster as dg

from flywheel.defs.assets import FLYWHEEL_ASSETS
from flywheel.defs.jobs import flywheel_gc, flywheel_iteration
from flywheel.defs.pipes import GpuLauncher
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.run_status import RUN_STATUS_SENSORS
from flywheel.defs.schedules import flywheel_iteration_schedule
from flywheel.defs.sensors import inbox_sensor
from flywheel.defs.terminal import flywheel_console


def gpu_launcher_from_env() -> GpuLauncher:
    backend = os.environ.get("FLYWHEEL_GPU_BACKEND", "auto")
    if backend not in ("auto", "subprocess", "k8s", "in_process"):
        raise ValueError(f"FLYWHEEL_GPU_BACKEND={backend!r}: use auto, subprocess, k8s or in_process")
    return GpuLauncher(
        backend=backend,
        k8s_image=os.environ.get("FLYWHEEL_K8S_IMAGE", ""),
        k8s_namespace=os.environ.get("FLYWHEEL_K8S_NAMESPACE", ""),
        k8s_gpus_per_pod=int(os.environ.get("FLYWHEEL_K8S_GPUS_PER_POD", "1")),
        k8s_volume_claim=os.environ.get("FLYWHEEL_K8S_VOLUME_CLAIM", ""),
        k8s_service_account=os.environ.get("FLYWHEEL_K8S_SERVICE_ACCOUNT", ""),
    )


def choose_executor(name: str) -> dg.ExecutorDefinition:
    if name == "k8s":
        from dagster_k8s import k8s_job_executor

        return k8s_job_executor
    if name == "multiprocess":
        return dg.multi_or_in_process_executor
    raise ValueError(f"executor {name!r}: use multiprocess or k8s (FLYWHEEL_EXECUTOR)")


def build_definitions(flywheel: FlywheelResource | None = None, gpu: GpuLauncher | None = None) -> dg.Definitions:
    flywheel = flywheel or FlywheelResource.from_env()
    return dg.Definitions(
        assets=FLYWHEEL_ASSETS,
        jobs=[flywheel_iteration, flywheel_gc],
        schedules=[flywheel_iteration_schedule],
        sensors=[inbox_sensor, *RUN_STATUS_SENSORS],
        resources={"flywheel": flywheel, "gpu": gpu or gpu_launcher_from_env()},
        executor=choose_executor(flywheel.executor),
        loggers={"flywheel_console": flywheel_console},
    )


defs = build_definitions()
