"""End to end: `dagster dev -w workspace.yaml` headless on a temporary flywheel home, a whole iteration launched
through the GraphQL API (the GPU stages as Pipes subprocesses on the `gpu` pool), waited for, and compared with
the same config launched by `flywheel iterate` on a second fresh home: the same artifact keys, registry versions
and aliases, decisions and refreshed dataset version. Then the server shuts down cleanly."""

import os
import signal
import tempfile
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flywheel.defs.ui import REPO_ROOT, dagster_command, group_alive, prepare_home, stop
from flywheel.pipeline import STAGE_LIST

pytestmark = pytest.mark.multiprocess

START_TIMEOUT_S = 120
PYCACHE = Path(tempfile.gettempdir()) / "flywheel-test-pycache"
RUN_TIMEOUT_S = 600
DOMAIN = "pusht-rotated"
# the same CPU-sized iteration as flywheel_tests/test_iteration.py
FAST = ["clips.max_clips_per_episode=1", "train.steps=10", "train.rank=4", "train.alpha=4", "train.checkpoint_every=5",
        "train.learning_rate=0.005", "train.warmup_steps=1", "train.f_max=1.0", "train.f_min=1.0",
        "evaluate.max_clips=1", "evaluate.seeds=[0]", "generate.seeds=[0]", "generate.max_videos=3",
        "generate.num_inference_steps=2", "label.idm.steps=20", "label.idm.batch_size=8",
        "refresh.usefulness_report=false", "gates.curation.min_pass_rate=0.0",
        "quality.calibrate_on=real",  # as test_iteration.FAST: the codec references are tested elsewhere,
        "label.idm.codec_augment=false"]  # and the IDM's training through the codec (test_stages, label/test_idm)

MATERIALIZATIONS = """
query RunMaterializations($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run {
      status
      assetMaterializations {
        assetKey { path }
        partition
        metadataEntries { label ... on PathMetadataEntry { path } ... on IntMetadataEntry { intValue } }
      }
    }
  }
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(port: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        assert proc.poll() is None, f"dagster dev exited early with code {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dagster dev did not serve on port {port} within {START_TIMEOUT_S}s")


def submit(client, **kwargs) -> str:
    """Submit once the code location has loaded (the webserver answers before it has)."""
    from dagster_graphql import DagsterGraphQLClientError

    deadline = time.time() + START_TIMEOUT_S
    while True:
        try:
            return client.submit_job_execution(**kwargs)
        except DagsterGraphQLClientError as e:
            if time.time() > deadline or "JobNotFoundError" not in str(e) and "RepositoryLocationNotFound" not in str(e):
                raise
            time.sleep(2)


@pytest.fixture
def dagster_dev(tmp_path):
    home, env = prepare_home(tmp_path / "home", gpus=1)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # dagster dev, its code servers, the run worker, each step worker and the Pipes workload are separate
    # Pythons importing torch & co.: share one bytecode cache so only the first one compiles.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    port = free_port()
    log = open(tmp_path / "dagster-dev.log", "w")
    proc = subprocess.Popen(dagster_command(port), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        t0 = time.time()
        wait_until_serving(port, proc)
        print(f"serving after {time.time() - t0:.0f}s")
        yield home, port, proc
    except BaseException:
        print((tmp_path / "dagster-dev.log").read_text()[-5000:])
        raise
    finally:
        if proc.poll() is None:  # a failed test: never leave a server (or its runs) behind
            stop(proc, timeout_s=30)
        log.close()


def what_a_run_decided(home: Path) -> dict:
    """Artifact keys by asset, check verdicts, registry versions with their aliases, and the refreshed version
    of the home's one run: what must not depend on how the run was launched."""
    import dagster as dg

    from flywheel.defs.instance import flywheel_instance
    from flywheel.lineage.registry import list_adapters

    instance = flywheel_instance(home)
    try:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
        records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        keys = {}
        for r in records:
            mat = r.event_log_entry.dagster_event.event_specific_data.materialization
            keys[mat.asset_key.path[-1]] = mat.metadata["key"].value
        checks = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        verdicts = {r.event_log_entry.dagster_event.event_specific_data.check_name:
                    r.event_log_entry.dagster_event.event_specific_data.passed for r in checks}
    finally:
        instance.dispose()
    versions = {v["version"]: sorted(v["aliases"]) for v in list_adapters(home, DOMAIN)}
    return {"keys": keys, "checks": verdicts, "versions": versions, "refreshed": keys.get("refreshed_dataset")}


def test_the_ui_and_the_cli_launch_the_same_run_and_the_server_stops_cleanly(dagster_dev, tmp_path, request):
    from dagster import DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient

    from flywheel.config import load_config
    from flywheel.defs.instance import flywheel_instance
    from flywheel.defs.launch import run_config

    home, port, proc = dagster_dev
    started = time.time()
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    config = load_config(set_args=FAST)
    launchpad = run_config(config, home)
    launchpad.pop("loggers")  # the UI keeps its default loggers
    run_id = submit(client, job_name="flywheel_iteration", run_config=launchpad,
                    tags={"dagster/partition": DOMAIN})  # the embedded sample, registered on first start
    print(f"submitted after {time.time() - started:.0f}s")
    # the same config from the CLI, on a second fresh home, while the UI's run goes on (the two share nothing)
    other = tmp_path / "cli-home"
    cli_log = open(tmp_path / "cli.log", "w")
    # the UI's step processes run with one torch thread (the server's env): so does the CLI here, since float
    # reductions over another thread count give other low bits, other labels, another (correct) version id
    cli_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPYCACHEPREFIX": str(PYCACHE)}
    cli_run = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "iterate", "--home", str(other),
                            *(f"--set={s}" for s in FAST)], cwd=REPO_ROOT, env=cli_env, stdout=cli_log,
                           stderr=subprocess.STDOUT)
    request.addfinalizer(lambda: cli_run.poll() is None and cli_run.kill())  # a failed test leaves no CLI run behind
    deadline = time.time() + RUN_TIMEOUT_S
    status = client.get_run_status(run_id)
    while status not in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
        assert time.time() < deadline, f"run {run_id} still {status} after {RUN_TIMEOUT_S}s"
        time.sleep(2)
        status = client.get_run_status(run_id)
    if status != DagsterRunStatus.SUCCESS:
        instance = flywheel_instance(home)
        errors = [str(r.dagster_event.event_specific_data) for r in instance.all_logs(run_id)
                  if r.dagster_event and r.dagster_event.is_failure]
        pytest.fail(f"run {run_id} ended {status}: {errors}")
    print(f"run done after {time.time() - started:.0f}s")
    data = client._execute(MATERIALIZATIONS, {"runId": run_id})["runOrError"]
    assert {m["partition"] for m in data["assetMaterializations"]} == {DOMAIN}

    code = cli_run.wait(timeout=RUN_TIMEOUT_S)
    cli_log.close()
    assert code == 0, (tmp_path / "cli.log").read_text()[-5000:]
    ui, cli = what_a_run_decided(home), what_a_run_decided(other)
    assert len(ui["keys"]) == len(STAGE_LIST) and set(ui["checks"]) >= {"enough_episodes", "model_fits_the_data", "adapter_gate"}
    assert ui == cli

    os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C / `flywheel ui` shutdown sends
    assert proc.wait(timeout=60) == 0  # dagster dev stopped its webserver and daemon and exited cleanly
    stop(proc, timeout_s=10)  # and no code server of its group is left behind
    assert not group_alive(proc.pid)
    with socket.socket() as s:  # the port is free again: nothing left serving
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))
