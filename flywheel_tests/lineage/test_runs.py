"""Tracking store resolution, iteration/step runs, dataset inputs, and idempotent re-runs (real sqlite store)."""

from pathlib import Path

import pytest

from flywheel.lineage import runs, tracking
from flywheel_tests.lineage import clear_tracking_env, shared_home


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


def test_tracking_uri_is_absolute_sqlite_in_home_unless_overridden(tmp_path, monkeypatch):
    clear_tracking_env()
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri("relative-home")
    assert uri == f"sqlite:///{tmp_path.resolve()}/relative-home/mlflow/mlflow.db"
    assert tracking.artifact_root("relative-home") == (tmp_path / "relative-home/mlflow/artifacts").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.tracking_uri("relative-home") == "http://tracking:5000"
    assert tracking.artifact_root("relative-home") is None  # the server decides
    monkeypatch.setenv("FLYWHEEL_MLFLOW_URI", "postgresql://u@db/mlflow")
    assert tracking.tracking_uri("x") == "postgresql://u@db/mlflow"
    env = tracking.tracking_env("x")
    assert env["MLFLOW_TRACKING_URI"] == env["FLYWHEEL_MLFLOW_URI"] == "postgresql://u@db/mlflow"
    assert env["FLYWHEEL_HOME"] == str((tmp_path / "x").resolve())


def test_bad_domain_is_refused_with_the_rule():
    with pytest.raises(ValueError, match="lowercase letters"):
        tracking.experiment_name("Bad Domain/1")


def test_store_is_wal_sqlite_and_ensure_is_repeatable(home):
    import sqlite3

    assert tracking.ensure_tracking_store(home) == tracking.ensure_tracking_store(home)
    db = Path(home) / "mlflow" / "mlflow.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("select count(*) from alembic_version").fetchone()[0] == 1


def test_iteration_and_step_runs_carry_lineage_tags_metrics_and_datasets(home):
    client = tracking.client(home)
    parent = runs.start_iteration_run(home, "runs-a", 3, dagster_run_id="dg-1", code_version="abc123")
    with runs.step_run(home, parent, "train_adapter", "runs-a", "dg-1", "train/runs-a/k1", "abc123") as run:
        run.log_params({"lr": 1e-4, "lora": {"rank": 8, "alpha": 16}})
        progress = run.progress_callback(every=2)
        for step in range(5):
            progress({"step": step, "loss": 1.0 / (step + 1), "samples_per_s": 3.0, "phase": "train"})
        progress({"step": 5, "loss": 0.1, "done": True})
        run.log_dataset_input("demonstrations", "d" * 64, "/data/demos", "demonstrations", schema={"fps": 30}, profile={"episodes": 24})
        run.log_dataset_input("clips", "c" * 64, "/data/clips", "clips")
    got = client.get_run(run.run_id)
    tags = got.data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert (tags["flywheel.kind"], tags["flywheel.asset"], tags["flywheel.partition"]) == ("step", "train_adapter", "runs-a")
    assert (tags["dagster.run_id"], tags["flywheel.code_version"], tags["flywheel.iteration"]) == ("dg-1", "abc123", "3")
    assert tags["flywheel.env.python"] and tags["flywheel.env.mlflow"].startswith("3.")
    assert "flywheel.env.gpu" in tags and "flywheel.env.dagster" in tags
    assert got.data.params == {"lr": "0.0001", "lora.rank": "8", "lora.alpha": "16"}
    assert got.info.status == "FINISHED"
    history = client.get_metric_history(run.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4, 5]
    assert history[-1].value == pytest.approx(0.1)
    assert got.data.metrics["peak_rss_mb"] > 10 and got.data.metrics["wall_time_s"] >= 0
    inputs = {d["name"]: d for d in runs.dataset_inputs(home, run.run_id)}
    assert inputs["demonstrations"]["digest"] == "d" * 64  # our digest, in full
    assert inputs["demonstrations"]["profile"] == {"kind": "demonstrations", "episodes": 24}
    assert inputs["clips"]["context"] == "training"
    # The UI search box finds runs by MLflow dataset digest (our digest's first 32 hex digits).
    found = client.search_runs([got.info.experiment_id], f"dataset.digest = '{'c' * 32}'")
    assert [r.info.run_id for r in found] == [run.run_id]


def test_rerun_with_same_keys_reuses_runs_and_keeps_params_immutable(home):
    client = tracking.client(home)
    first = runs.start_iteration_run(home, "runs-b", 0, "dg-1", "v1")
    again = runs.start_iteration_run(home, "runs-b", 0, "dg-2", "v1")
    assert first == again
    assert client.get_run(first).data.tags["dagster.run_id"] == "dg-2"  # latest attempt
    with runs.step_run(home, first, "clips", "runs-b", "dg-1", "clips/runs-b/x", "v1") as a:
        a.log_params({"window_s": 2.0})
        assert not a.reused
    with runs.step_run(home, first, "clips", "runs-b", "dg-2", "clips/runs-b/x", "v1") as b:
        b.log_params({"window_s": 2.0})  # same value: accepted
        assert b.reused and b.run_id == a.run_id
        with pytest.raises(ValueError, match="window_s"):
            b.log_params({"window_s": 3.0})
    experiment = client.get_experiment_by_name("flywheel-runs-b").experiment_id
    steps = runs.find_runs(client, [experiment], {"flywheel.step_key": "clips/runs-b/x"})
    assert len(steps) == 1 and steps[0].data.tags["dagster.run_id"] == "dg-2"


def test_failed_step_is_marked_failed_and_error_propagates(home):
    client = tracking.client(home)
    with pytest.raises(RuntimeError, match="boom"):
        with runs.step_run(home, None, "label", "runs-c", None, "label/runs-c/1", log_environment=False) as run:
            raise RuntimeError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"


def test_dataset_input_refuses_unknown_kind_and_non_digest(home):
    run = runs.open_step_run(home, None, "x", "runs-d", None, "x/runs-d/1")
    with pytest.raises(ValueError, match="kind"):
        run.log_dataset_input("d", "a" * 64, "/p", "pictures")
    with pytest.raises(ValueError, match="content digest"):
        run.log_dataset_input("d", "abc", "/p", "clips")


KILLED_WORKER = """
import os, signal, sys
from flywheel.lineage.recorder import IterationLineage
lineage = IterationLineage.for_dagster_run(sys.argv[1], sys.argv[2], "dg-dies")
with lineage.stage("adapter", "k", {"rank": 4}) as run:
    print(lineage.run_id, run.run_id, lineage.iteration, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies mid-stage: nothing gets to close its runs
"""


@pytest.mark.multiprocess
def test_a_dead_process_runs_are_killed_at_the_next_start_and_its_iteration_number_is_given_back(home):
    import subprocess
    import sys

    from flywheel.lineage.recorder import IterationLineage, next_iteration

    domain = "runs-dead"
    done = subprocess.run([sys.executable, "-c", KILLED_WORKER, str(home), domain], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    parent_id, step_id, number = done.stdout.split()
    assert number == "1"
    client = tracking.client(home)
    assert client.get_run(parent_id).info.status == client.get_run(step_id).info.status == "RUNNING"

    lineage = IterationLineage.for_dagster_run(home, domain, "dg-next")
    assert lineage.iteration == 1  # the dead run's number, given back
    dead_parent, dead_step = client.get_run(parent_id), client.get_run(step_id)
    assert (dead_parent.info.status, dead_step.info.status) == ("KILLED", "KILLED")
    assert "flywheel.iteration" not in dead_parent.data.tags and dead_parent.data.tags["flywheel.released_iteration"] == "1"
    assert "given back" in dead_parent.info.run_name
    assert lineage.run_id != parent_id and next_iteration(home, domain) == 2


def test_a_parent_run_stays_running_until_its_run_ends_and_experiments_take_no_number(home):
    from flywheel.lineage.recorder import IterationLineage, close_dagster_run, next_iteration

    domain = "runs-parent"
    client = tracking.client(home)
    iteration = IterationLineage.for_dagster_run(home, domain, "dg-whole")
    assert iteration.numbered and next_iteration(home, domain) == 1  # nothing written before the first stage
    for asset in ("demonstrations", "training_clips"):
        with iteration.stage(asset, "k", {"n": 1}):
            pass
        assert client.get_run(iteration.run_id).info.status == "RUNNING"  # more stages may follow
    assert iteration.iteration == 1

    experiment = IterationLineage.for_dagster_run(home, domain, "dg-partial", numbered=False, label="adapter")
    with experiment.stage("adapter", "k", {"n": 1}) as run:
        pass
    parent = client.get_run(experiment.run_id)
    assert experiment.iteration is None and parent.data.tags["flywheel.kind"] == "experiment"
    assert "flywheel.iteration" not in parent.data.tags and "flywheel.iteration" not in client.get_run(run.run_id).data.tags
    assert next_iteration(home, domain) == 2

    assert close_dagster_run(home, "dg-whole", "FINISHED") == [iteration.run_id]
    assert client.get_run(iteration.run_id).info.status == "FINISHED"
    assert close_dagster_run(home, "dg-whole", "FINISHED") == [iteration.run_id]  # idempotent
    close_dagster_run(home, "dg-partial", "KILLED")  # a cancelled experiment: KILLED, no number to give back
    assert client.get_run(experiment.run_id).info.status == "KILLED"
    cancelled = IterationLineage.for_dagster_run(home, domain, "dg-cancelled")
    assert cancelled.iteration == 2
    close_dagster_run(home, "dg-cancelled", "KILLED")
    assert next_iteration(home, domain) == 2  # the cancelled iteration did not consume its number


def test_an_interrupted_step_is_killed_not_failed(home):
    client = tracking.client(home)
    with pytest.raises(KeyboardInterrupt):
        with runs.step_run(home, None, "label", "runs-c", None, "label/runs-c/interrupted", log_environment=False) as run:
            raise KeyboardInterrupt
    assert client.get_run(run.run_id).info.status == "KILLED"
