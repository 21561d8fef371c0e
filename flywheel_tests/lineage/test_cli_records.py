"""The records of the real CLI path: `flywheel iterate` (the Dagster job in-process, tiny settings) leaves one
FINISHED iteration with a FINISHED child run per stage and nothing RUNNING, the gate's governance run, and an
adapter version whose lineage agrees with its card; `flywheel iterate` SIGKILLed mid-run is closed at the next start
(KILLED, its `gpu` slot freed) and takes no iteration number. Minutes on a loaded 2-core machine: slow-marked."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from flywheel.cli import main as flywheel_main
from flywheel.lineage import registry, tracking
from flywheel.lineage.recorder import next_iteration
from flywheel.pipeline import STAGE_LIST
from flywheel_tests.lineage import clear_tracking_env

pytestmark = pytest.mark.slow

DOMAIN = "pusht-rotated"
FAST = ["--set", "clips.max_clips_per_episode=1", "--set", "train.steps=4", "--set", "train.rank=4",
        "--set", "train.alpha=4", "--set", "train.checkpoint_every=2", "--set", "evaluate.max_clips=1",
        "--set", "generate.seeds=[0]", "--set", "generate.max_videos=3", "--set", "generate.num_inference_steps=2",
        "--set", "label.idm.steps=20", "--set", "label.idm.batch_size=8", "--set", "refresh.usefulness_report=false",
        "--set", "gates.fit.enabled=false", "--set", "gates.curation.min_pass_rate=0"]


@pytest.fixture(scope="module")
def iterated(tmp_path_factory):
    clear_tracking_env()
    home = tmp_path_factory.mktemp("cli") / "home"
    assert flywheel_main(["iterate", "--home", str(home), *FAST]) == 0
    return home


def domain_runs(home, **tags):
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(f"flywheel-{DOMAIN}").experiment_id
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([experiment], query, max_results=1000)


def test_an_iteration_is_finished_when_its_run_is_and_its_records_agree(iterated):
    home = iterated
    (parent,) = domain_runs(home, **{"flywheel.kind": "iteration"})
    assert parent.info.status == "FINISHED" and parent.data.tags["flywheel.iteration"] == "1"
    children = domain_runs(home, **{"mlflow.parentRunId": parent.info.run_id})
    assert len(children) == len(STAGE_LIST) and {c.info.status for c in children} == {"FINISHED"}
    assert not [r for r in domain_runs(home) if r.info.status == "RUNNING"]
    (gate,) = domain_runs(home, **{"flywheel.kind": "governance"})
    assert gate.data.tags["flywheel.event"] in ("promote", "promote-refused")
    assert gate.data.tags["flywheel.actor"].startswith("Dagster run ")

    version = tracking.client(home).get_model_version(f"flywheel-{DOMAIN}", "1")
    adapter_dir = home / version.tags["flywheel.adapter_path"]
    card = json.loads((adapter_dir / "adapter_card.json").read_text())
    assert card["parent_adapter"] is None and version.tags["flywheel.parent_version"] == ""
    assert version.tags["flywheel.lineage"] == "trained" and "trained from the base model" in version.description
    _, registered = registry.resolve_adapter(home, DOMAIN, "1")
    weights = "pytorch_lora_weights.safetensors"
    assert os.stat(registered / weights).st_ino == os.stat(adapter_dir / weights).st_ino  # stored once


def test_a_killed_iterate_is_closed_at_the_next_start_and_takes_no_number(iterated):
    """`flywheel iterate` SIGKILLed mid-run: its MLflow runs stay RUNNING and its Dagster run keeps the `gpu` slot
    until the next start (reap_dead_runs, before a launch) cancels the Dagster run, frees the slot, and closes the
    MLflow runs as KILLED, giving the iteration number back."""
    from flywheel.defs.instance import flywheel_instance
    from flywheel.defs.run_status import reap_dead_runs

    home = iterated
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "iterate", "--home", str(home), *FAST,
                             "--set", "train.steps=6"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not [r for r in domain_runs(home, **{"flywheel.kind": "step", "flywheel.asset": "adapter"})
                   if r.info.status == "RUNNING"]:  # killed while training holds the gpu slot
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the second iteration never reached training"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (running,) = [r for r in domain_runs(home, **{"flywheel.kind": "iteration"}) if r.info.status == "RUNNING"]
    assert running.data.tags["flywheel.iteration"] == "2"
    instance = flywheel_instance(home)
    try:
        dagster_run_id = running.data.tags["dagster.run_id"]
        claimed = instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
        assert [slot.run_id for slot in claimed] == [dagster_run_id]
        assert reap_dead_runs(instance, home) == [dagster_run_id]
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    finally:
        instance.dispose()
    killed = tracking.client(home).get_run(running.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["flywheel.released_iteration"] == "2"
    assert not [r for r in domain_runs(home) if r.info.status == "RUNNING"]
    assert next_iteration(home, DOMAIN) == 2
