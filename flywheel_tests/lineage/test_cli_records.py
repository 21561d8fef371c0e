"""The records of the real CLI path: `flywheel iterate` (the Dagster job in-process, tiny settings) leaves one
FINISHED iteration with a FINISHED child run per stage and nothing RUNNING, the gate's governance run, and an
adapter version whose lineage agrees with its card; `flywheel iterate` interrupted by Ctrl-C leaves KILLED runs
and takes no iteration number. Minutes on a loaded 2-core machine: slow-marked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flywheel.cli import main as flywheel_main
from flywheel.lineage import registry, tracking
from flywheel.lineage.recorder import next_iteration
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
    assert len(children) == 8 and {c.info.status for c in children} == {"FINISHED"}
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


def test_an_interrupted_iterate_is_killed_and_takes_no_number(iterated):
    home = iterated
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "iterate", "--home", str(home), *FAST,
                             "--set", "train.steps=6"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not [r for r in domain_runs(home, **{"flywheel.kind": "iteration"}) if r.info.status == "RUNNING"]:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the second iteration never started"
            time.sleep(1)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    iterations = domain_runs(home, **{"flywheel.kind": "iteration"})
    killed = [r for r in iterations if r.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags["flywheel.released_iteration"] == "2"
    assert not [r for r in domain_runs(home) if r.info.status == "RUNNING"]
    assert next_iteration(home, DOMAIN) == 2
    assert Path(home).is_dir()
