"""When a Dagster run ends, its MLflow parent runs end with it: FINISHED, FAILED, or KILLED when cancelled.

The daemon evaluates these run-status sensors for runs launched from the UI, the schedule and the inbox
sensor; `flywheel iterate` runs the job in-process (no daemon needed) and calls `close_lineage_of_run` itself
once `execute_in_process` returns (flywheel.defs.launch). Both are idempotent, so a run seen by both ends
once. Runs whose process died without either (SIGKILL) are closed at the next start on the host
(flywheel.lineage.recorder.close_dead_runs).
"""

from __future__ import annotations

import dagster as dg

from flywheel.defs.lineage import mlflow_status, use_tracking_store
from flywheel.defs.resources import FlywheelResource
from flywheel.lineage.recorder import close_dagster_run


def close_lineage_of_run(home, run: dg.DagsterRun | None) -> list[str]:
    """End the MLflow parent runs of a Dagster run that has ended (its MLflow status: mlflow_status); the
    closed run ids. Nothing while the run has not ended."""
    status = mlflow_status(run)
    if status is None:
        return []
    return close_dagster_run(home, run.run_id, status)


def _close_on(status: dg.DagsterRunStatus) -> dg.RunStatusSensorDefinition:
    @dg.run_status_sensor(
        run_status=status,
        name=f"mlflow_close_on_{status.value.lower()}",
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=10,
        description=f"Ends the MLflow parent runs of a flywheel run that ended with {status.value} "
                    "(FINISHED, FAILED or KILLED), and any child run it left RUNNING.",
    )
    def _sensor(context: dg.RunStatusSensorContext, flywheel: FlywheelResource):
        use_tracking_store(flywheel)
        closed = close_lineage_of_run(flywheel.home_path, context.dagster_run)
        if closed:
            context.log.info(f"Dagster run {context.dagster_run.run_id}: ended MLflow runs {', '.join(closed)}")

    return _sensor


RUN_STATUS_SENSORS = [_close_on(s) for s in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE,
                                             dg.DagsterRunStatus.CANCELED)]


def reap_dead_runs(instance: dg.DagsterInstance, home) -> list[str]:
    """Dagster runs of this instance still marked in progress whose process died (SIGKILL, a crash): marked
    CANCELED with their pool slots (e.g. `gpu`) freed, their MLflow runs KILLED. Returns their run ids.

    Dagster keeps such a run STARTED and its pool slot claimed, so every later run waits for that slot forever.
    A run counts as dead when each of its MLflow parent runs names a process (flywheel.lineage.runs.owner_tags)
    that this host can see is gone; a run without a parent run (no stage started) or of another host is left
    alone. Call it before launching (flywheel.defs.launch) and wherever runs are started by hand."""
    from flywheel.lineage import runs, tracking

    in_progress = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    candidates = instance.get_runs(filters=dg.RunsFilter(statuses=in_progress))
    if not candidates:
        return []
    client = tracking.client(home)
    experiments = tracking.flywheel_experiment_ids(client)
    reaped = []
    for run in candidates:
        parents = [r for r in runs.find_runs(client, experiments, {tracking.TAG_DAGSTER_RUN_ID: run.run_id})
                   if r.data.tags.get(tracking.TAG_KIND) in ("iteration", "experiment")] if experiments else []
        if not parents or any(runs.owner_alive(p.data.tags) is not False for p in parents):
            continue
        instance.report_run_canceled(run, message="its process is gone (found by flywheel at the next start)")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        close_dagster_run(home, run.run_id, "KILLED")
        reaped.append(run.run_id)
    return reaped
