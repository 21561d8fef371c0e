"""End to end: `dagster dev -w workspace.yaml` headless on a temporary flywheel home, a run launched through
the GraphQL API (ingest + clips, the clips encoding as a Pipes subprocess on the `gpu` pool), waited for,
its materializations checked, and the server shut down cleanly."""

import os
import signal
import tempfile
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from flywheel.defs.ui import REPO_ROOT, dagster_command, group_alive, prepare_home, stop

pytestmark = pytest.mark.multiprocess

START_TIMEOUT_S = 120
PYCACHE = Path(tempfile.gettempdir()) / "flywheel-test-pycache"
RUN_TIMEOUT_S = 240

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


def test_run_launched_through_graphql_materializes_and_the_server_stops_cleanly(dagster_dev):
    from dagster import DagsterRunStatus
    from dagster_graphql import DagsterGraphQLClient

    from flywheel.defs.instance import flywheel_instance

    home, port, proc = dagster_dev
    started = time.time()
    client = DagsterGraphQLClient("127.0.0.1", port_number=port)
    run_id = submit(
        client,
        job_name="flywheel_iteration",
        asset_selection=["demonstrations", "training_clips"],
        run_config={"ops": {"training_clips": {"config": {"max_clips_per_episode": 1}}}},
        tags={"dagster/partition": "pusht-rotated"},  # the embedded sample, registered on first start
    )
    print(f"submitted after {time.time() - started:.0f}s")
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
    mats = {m["assetKey"]["path"][-1]: m for m in data["assetMaterializations"]}
    assert set(mats) == {"demonstrations", "training_clips"}
    assert {m["partition"] for m in mats.values()} == {"pusht-rotated"}
    entries = {m: {e["label"]: e.get("path", e.get("intValue")) for e in mats[m]["metadataEntries"]} for m in mats}
    assert entries["demonstrations"]["episodes"] == 10
    assert entries["training_clips"]["latent_cache"].startswith(str(home))
    assert os.path.isdir(entries["training_clips"]["latent_cache"])

    os.killpg(proc.pid, signal.SIGTERM)  # what Ctrl-C / `flywheel ui` shutdown sends
    assert proc.wait(timeout=60) == 0  # dagster dev stopped its webserver and daemon and exited cleanly
    stop(proc, timeout_s=10)  # and no code server of its group is left behind
    assert not group_alive(proc.pid)
    with socket.socket() as s:  # the port is free again: nothing left serving
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # closed connections may linger in TIME_WAIT
        s.bind(("127.0.0.1", port))
