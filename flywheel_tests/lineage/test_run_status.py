"""MLflow parent runs end with their Dagster run: the CLI's in-process run interrupted (Ctrl-C) and a run cancelled
in the UI (the daemon's run-status sensor) leave KILLED runs that took no iteration number; a successful run's
parent is FINISHED only then. Real Dagster runs on a temporary instance, real MLflow store."""

import dagster as dg
import pytest

from flywheel.defs.lineage import is_whole_iteration
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.run_status import RUN_STATUS_SENSORS, close_lineage_of_run, reap_dead_runs
from flywheel.lineage import tracking
from flywheel.lineage.recorder import IterationLineage, next_iteration
from flywheel.pipeline import STAGE_LIST
from flywheel_tests.lineage import shared_home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


def stage_job(domain: str, interrupt: bool):
    """A one-op job whose op opens the run's iteration and a stage in it, as a flywheel asset does."""

    @dg.op
    def stage(context: dg.OpExecutionContext):
        lineage = IterationLineage.for_dagster_run(tracking.resolve_home(), domain, context.run_id)
        with lineage.stage("adapter", "k", {"rank": 4}):
            context.log.info(f"iteration {lineage.iteration}")
            if interrupt:
                raise KeyboardInterrupt  # Ctrl-C in `flywheel iterate`

    @dg.job(name=f"stage_{'interrupted' if interrupt else 'done'}")
    def job():
        stage()

    return job


def parents_of(home, dagster_run_id):
    client = tracking.client(home)
    found = client.search_runs(tracking.flywheel_experiment_ids(client), f"tags.`dagster.run_id` = '{dagster_run_id}'")
    return {r.data.tags["flywheel.kind"]: r for r in found}


def test_an_interrupted_in_process_run_is_killed_and_gives_its_number_back(home, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_HOME", str(home))
    domain = "status-cli"
    with dg.instance_for_test() as instance:
        done = stage_job(domain, interrupt=False).execute_in_process(instance=instance)
        run = parents_of(home, done.run_id)["iteration"]
        assert run.info.status == "RUNNING" and run.data.tags["flywheel.iteration"] == "1"  # the run has not ended
        close_lineage_of_run(home, instance.get_run_by_id(done.run_id))  # what `launch` does after the run
        assert parents_of(home, done.run_id)["iteration"].info.status == "FINISHED"

        interrupted = stage_job(domain, interrupt=True).execute_in_process(instance=instance, raise_on_error=False)
        dagster_run = instance.get_run_by_id(interrupted.run_id)
        assert dagster_run.status == dg.DagsterRunStatus.FAILURE  # Dagster calls it a failure ...
        close_lineage_of_run(home, dagster_run)
    found = parents_of(home, interrupted.run_id)  # ... the records call it what it was
    assert (found["iteration"].info.status, found["step"].info.status) == ("KILLED", "KILLED")
    assert found["iteration"].data.tags["flywheel.released_iteration"] == "2"
    assert next_iteration(home, domain) == 2


def test_a_cancelled_run_is_killed_by_the_run_status_sensor(home):
    domain = "status-ui"
    job = stage_job(domain, interrupt=False)
    flywheel = FlywheelResource(home=str(home))
    sensors = {s.name: s for s in RUN_STATUS_SENSORS}
    with dg.instance_for_test() as instance:
        dagster_run = instance.create_run_for_job(job_def=job)
        lineage = IterationLineage.for_dagster_run(home, domain, dagster_run.run_id)
        with lineage.stage("demonstrations", "k", {"n": 1}):
            pass
        assert lineage.iteration == 1
        instance.report_run_canceled(dagster_run)
        cancelled = instance.get_run_by_id(dagster_run.run_id)
        event = next(r.event_log_entry.dagster_event for r in instance.get_records_for_run(dagster_run.run_id).records
                     if r.event_log_entry.dagster_event and r.event_log_entry.dagster_event.event_type_value == "PIPELINE_CANCELED")
        context = dg.build_run_status_sensor_context(sensor_name="mlflow_close_on_canceled", dagster_event=event,
                                                     dagster_instance=instance, dagster_run=cancelled,
                                                     resources={"flywheel": flywheel})
        sensors["mlflow_close_on_canceled"](context)
    parent = parents_of(home, dagster_run.run_id)["iteration"]
    assert parent.info.status == "KILLED" and "flywheel.iteration" not in parent.data.tags
    assert next_iteration(home, domain) == 1  # the cancelled run did not consume an iteration number


def test_a_run_whose_process_died_is_reaped_and_frees_its_pool_slot(home):
    """A SIGKILLed `flywheel iterate` leaves its Dagster run STARTED holding the `gpu` slot, which would make every
    later run wait forever; the next start cancels it, frees the slot and kills its MLflow runs."""
    import subprocess
    import sys

    domain = "status-dead"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has ended: what a SIGKILLed run worker leaves behind
    with dg.instance_for_test() as instance:
        storage = instance.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        dagster_run = instance.create_run_for_job(job_def=stage_job(domain, interrupt=False))
        instance.handle_run_event(dagster_run.run_id, dg.DagsterEvent(
            event_type_value="PIPELINE_START", job_name=dagster_run.job_name))
        lineage = IterationLineage.for_dagster_run(home, domain, dagster_run.run_id, owner_pid=dead_pid)
        with lineage.stage("adapter", "k", {"n": 1}):
            assert storage.claim_concurrency_slot("gpu", dagster_run.run_id, "adapter").is_claimed
        live = instance.create_run_for_job(job_def=stage_job(domain, interrupt=False))  # no MLflow parent: left alone
        assert reap_dead_runs(instance, home) == [dagster_run.run_id]
        assert instance.get_run_by_id(dagster_run.run_id).status == dg.DagsterRunStatus.CANCELED
        assert instance.get_run_by_id(live.run_id).status == dg.DagsterRunStatus.NOT_STARTED
        assert not storage.get_concurrency_info("gpu").claimed_slots
    parent = parents_of(home, dagster_run.run_id)["iteration"]
    assert parent.info.status == "KILLED" and parent.data.tags["flywheel.released_iteration"] == "1"
    assert next_iteration(home, domain) == 1


def test_only_a_run_of_every_stage_is_a_numbered_iteration():
    every = [dg.AssetKey(s.asset) for s in STAGE_LIST]
    assert is_whole_iteration(None) and is_whole_iteration(frozenset(every))
    assert not is_whole_iteration(frozenset(every[:3]))  # `flywheel train`
    assert not is_whole_iteration(frozenset([dg.AssetKey("synthetic_videos")]))  # one asset re-materialized
