"""Runs whose process is gone: a `flywheel` command killed mid-run (SIGKILL, OOM, a closed laptop) leaves its
Dagster run STARTED and its MLflow runs RUNNING forever, since the process that would end them is dead.

The CLI tags every run it launches with its pid and host (`launch`); the next launch on the same home fails
the runs whose process no longer exists on this host (with the reason), frees the concurrency slots they held
and ends their MLflow runs as KILLED. Runs launched elsewhere (the Dagster UI, another host) are not touched:
their process cannot be checked from here.
"""

from __future__ import annotations

import os
import socket

import dagster as dg

PID_TAG = "flywheel/pid"
HOST_TAG = "flywheel/host"
UNFINISHED = [dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED,
              dg.DagsterRunStatus.CANCELING]


def process_tags() -> dict[str, str]:
    """The tags that let a later launch tell whether this process is still running the run."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def fail_dead_runs(instance: dg.DagsterInstance, home) -> list[str]:
    """Fail the unfinished runs of this host whose process is gone; returns their run ids."""
    from flywheel.lineage.runs import end_runs_of_dagster_run
    from flywheel.store import process_alive_here

    host = socket.gethostname()
    failed = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or int(pid) == os.getpid() or process_alive_here(int(pid), host):
            continue
        instance.report_run_failed(run, message=f"the process that ran it (pid {pid} on {host}) is gone (killed or "
                                                "crashed); marked failed by the next flywheel launch on this home")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        end_runs_of_dagster_run(home, run.run_id, "KILLED")
        failed.append(run.run_id)
    return failed
