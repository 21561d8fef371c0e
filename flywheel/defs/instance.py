"""The Dagster instance of a flywheel home: DAGSTER_HOME = <home>/dagster, persistent across restarts.

`<home>/dagster/dagster.yaml` is written once (edit it freely afterwards, e.g. for Postgres storage, see
docs/dagster.md): telemetry off, op-level pools with a default limit of the number of GPUs, so the GPU
steps (`pool="gpu"`) queue instead of colliding. The `gpu` pool's limit is also set explicitly on every
start, so changing FLYWHEEL_GPUS takes effect without editing the file.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from flywheel.store import atomic_write_bytes, resolve_home

GPU_POOL = "gpu"

INSTANCE_YAML = """\
# Dagster instance of this flywheel home, written by flywheel (flywheel/defs/instance.py) when missing.
# Edit freely: flywheel does not overwrite it. Postgres storage and the k8s executor: docs/dagster.md.
telemetry:
  enabled: false
concurrency:
  pools:
    granularity: op
    # Pools without their own limit; the only pool flywheel uses is `gpu` (set to FLYWHEEL_GPUS on start).
    default_limit: {gpus}
  runs:
    max_concurrent_runs: {max_runs}
"""


def dagster_home(home: str | os.PathLike | None = None) -> Path:
    return resolve_home(home) / "dagster"


def write_instance_config(home: str | os.PathLike | None = None, gpus: int = 1, overwrite: bool = False) -> Path:
    """Create `<home>/dagster/dagster.yaml` if it does not exist; return its folder (the DAGSTER_HOME)."""
    folder = dagster_home(home)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dagster.yaml"
    if overwrite or not path.is_file():
        text = INSTANCE_YAML.format(gpus=max(1, gpus), max_runs=max(2, 2 * gpus))
        atomic_write_bytes(path, text.encode())
    return folder


def use_flywheel_instance(home: str | os.PathLike | None = None, gpus: int | None = None) -> Path:
    """Point this process (and the processes it starts) at the home's Dagster instance; set the gpu pool."""
    if gpus is None:
        from flywheel.defs.resources import detected_gpus

        gpus = int(os.environ["FLYWHEEL_GPUS"]) if os.environ.get("FLYWHEEL_GPUS") else detected_gpus()
    folder = write_instance_config(home, gpus)
    os.environ["DAGSTER_HOME"] = str(folder)
    os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    instance = flywheel_instance(home)
    try:
        set_gpu_pool_limit(instance, gpus)
    finally:
        instance.dispose()
    return folder


def flywheel_instance(home: str | os.PathLike | None = None, echo_step_output: bool = True):
    """The DagsterInstance stored under the flywheel home (created on first use). `echo_step_output=False`
    (the CLI's runs): steps' stdout/stderr go to the compute logs only, not back to this terminal."""
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    folder = write_instance_config(home)
    overrides = None
    if not echo_step_output:
        overrides = {"compute_logs": {"module": "flywheel.defs.compute_logs", "class": "CapturedComputeLogManager",
                                      "config": {"base_dir": str(folder / "storage")}}}
    # The first processes on a fresh home would create the sqlite schemas at once, and Dagster's migrations race
    # ("table ... already exists"): creating the storages is serialized across processes.
    with open(folder / ".instance.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(folder), overrides=overrides))
            for storage in ("run_storage", "event_log_storage", "schedule_storage"):
                getattr(instance, storage)  # created (and migrated) now, under the lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return instance


def set_gpu_pool_limit(instance, gpus: int) -> None:
    """At most `gpus` GPU steps at once (at least one, so a CPU-only machine still runs them one by one)."""
    instance.event_log_storage.set_concurrency_slots(GPU_POOL, max(1, gpus))
