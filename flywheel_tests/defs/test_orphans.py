"""A killed `flywheel` process leaves its Dagster run STARTED and its MLflow runs RUNNING; the next launch on the
home fails the run (with the reason) and ends the MLflow runs, and leaves live processes' runs alone.
(The whole story, SIGKILL included, runs in benchmarks/reliability.py's kill trials.)"""

import os
import socket
import subprocess
import uuid

import dagster as dg

from flywheel.defs.instance import flywheel_instance
from flywheel.defs.orphans import HOST_TAG, PID_TAG, fail_dead_runs
from flywheel.lineage import runs, tracking


def a_dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def started_run(instance, home, pid: int, host: str) -> tuple[str, str]:
    """A STARTED Dagster run tagged with (pid, host), and the MLflow iteration run it opened."""
    run_id = str(uuid.uuid4())
    instance.add_run(dg.DagsterRun(job_name="flywheel_iteration", run_id=run_id, status=dg.DagsterRunStatus.STARTED,
                                   tags={PID_TAG: str(pid), HOST_TAG: host}))
    mlflow_run = runs.start_iteration_run(home, "cell-a", len(instance.get_run_ids()), run_id)
    return run_id, mlflow_run


def test_the_runs_of_a_dead_process_are_failed_and_the_others_left_alone(tmp_path):
    home = tmp_path / "home"
    instance = flywheel_instance(home)
    try:
        dead, dead_mlflow = started_run(instance, home, a_dead_pid(), socket.gethostname())
        alive, alive_mlflow = started_run(instance, home, os.getppid(), socket.gethostname())
        elsewhere, _ = started_run(instance, home, a_dead_pid(), "another-host")

        assert fail_dead_runs(instance, home) == [dead]

        assert instance.get_run_by_id(dead).status == dg.DagsterRunStatus.FAILURE
        failure = [e for e in instance.all_logs(dead) if e.dagster_event and e.dagster_event.event_type_value == "PIPELINE_FAILURE"]
        assert failure and "is gone" in failure[0].dagster_event.message
        assert instance.get_run_by_id(alive).status == dg.DagsterRunStatus.STARTED
        assert instance.get_run_by_id(elsewhere).status == dg.DagsterRunStatus.STARTED  # its process is not ours to judge
        client = tracking.client(home)
        assert client.get_run(dead_mlflow).info.status == "KILLED"
        assert client.get_run(alive_mlflow).info.status == "RUNNING"
        assert fail_dead_runs(instance, home) == []  # nothing twice
    finally:
        instance.dispose()
