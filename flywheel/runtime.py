"""How many CPU threads each flywheel process gives torch.

torch's default intra-op thread count is the machine's core count, whatever share of it the process may
use: under a CPU quota, a pinned affinity or several flywheel processes on one host, the threads fight over
too few cores (measured in issue 18: a tiny LoRA step took 13.7 s under load with the default, about 3 s with
one thread per process). `configure_threads()` picks the count once per process and returns what it chose,
so it can be recorded in run metadata:

    OMP_NUM_THREADS when it is set (the user's word), else
    the cores this process may run on (its CPU affinity, capped by a cgroup CPU quota) divided among the
    processes torchrun started on this host (LOCAL_WORLD_SIZE), at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: str | os.PathLike = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores (e.g. 1.5), or None when there is none.

    cgroup v2: `cpu.max` holds "<quota> <period>" or "max <period>"; v1: cpu/cpu.cfs_quota_us (-1: none) over
    cpu/cpu.cfs_period_us. Read at the mount root, which is the process's own cgroup inside a container."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> tuple[int, dict]:
    """Cores this process may use (at least 1) and how that was found."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_limit(cgroup_root)
    cores = affinity if quota is None else min(affinity, max(1, math.floor(quota)))
    return max(1, cores), {"affinity_cores": affinity, "cgroup_cpu_quota": quota}


def configure_threads(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> dict:
    """Set torch's intra-op thread count for this process; returns the choice and its reasons
    ({"torch_threads", "threads_source", "affinity_cores", "cgroup_cpu_quota", "local_processes"})."""
    import torch

    cores, facts = available_cores(cgroup_root)
    local_processes = _positive_int(os.environ.get("LOCAL_WORLD_SIZE")) or 1
    requested = _positive_int(os.environ.get("OMP_NUM_THREADS"))
    if requested:
        threads, source = requested, "OMP_NUM_THREADS"
    else:
        threads, source = max(1, cores // local_processes), "available cores"
    torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "threads_source": source, **facts,
            "local_processes": local_processes}


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None
