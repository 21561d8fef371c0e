"""Lineage written by flywheel, read back over plain HTTP from a real `mlflow server` on the same store."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flywheel.lineage import registry, runs, tracking
from flywheel_tests.lineage import BASE_MODEL, OVERRIDE_ENV, make_adapter, shared_home

pytestmark = pytest.mark.multiprocess

DOMAIN = "rest"
STARTUP_TIMEOUT_S = 240  # the CLI and its uvicorn worker each import all of mlflow; slow on a busy box


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return shared_home(tmp_path_factory)


@pytest.fixture(scope="module")
def logged(home, tmp_path_factory):
    """An adapter trained, promoted and used for generation, logged before the server starts."""
    adapter = make_adapter(tmp_path_factory.mktemp("adapter") / "a", seed=7)
    parent = runs.start_iteration_run(home, DOMAIN, 0, "dg-rest", "c1")
    with runs.step_run(home, parent, "adapter", DOMAIN, "dg-rest", "adapter/rest/0", "c1", log_environment=False) as run:
        version = registry.register_adapter(home, DOMAIN, adapter, None, "e" * 64, 0, run_id=run.run_id)
    registry.promote(home, DOMAIN, version, registry.evaluate_gate({"s": 1.0}, {"s": 0.5}, None, {"metrics": [{"name": "s"}]}))
    synthetic = "5a" * 32
    with runs.step_run(home, parent, "synthetic", DOMAIN, "dg-rest", "synthetic/rest/0", "c1", log_environment=False) as run:
        runs.log_synthetic_set(run, DOMAIN, version, synthetic, "/home/synthetic/5a", [{"episode_id": "e0", "prompt": "wave", "seed": 3}])
    return {"version": version, "synthetic": synthetic, "generation_run": run.run_id}


@pytest.fixture(scope="module")
def server(home, logged):
    """`mlflow server` on the store's sqlite file; stopped (whole process group) afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDE_ENV}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job workers for a read-only check
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow_cli), "server",
        "--backend-store-uri", tracking.tracking_uri(home),
        "--default-artifact-root", tracking.artifact_root(home),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = (Path(home) / "mlflow-server.log").open("w")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"mlflow server exited early: {(Path(home) / 'mlflow-server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not become healthy in time"
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)
        log.close()
    assert proc.poll() is not None


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl+C to the server's process group (CLI + uvicorn worker), then SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGINT, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            os.killpg(proc.pid, signal.SIGKILL)  # reap a worker that outlived the CLI
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def _get(base, endpoint, **query):
    with urllib.request.urlopen(f"{base}{endpoint}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return response.read()


def _post(base, endpoint, payload):
    request = urllib.request.Request(
        f"{base}{endpoint}", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_lineage_is_readable_through_the_rest_api(server, logged):
    champion = json.loads(_get(server, "/api/2.0/mlflow/registered-models/alias", name=f"flywheel-{DOMAIN}", alias="champion"))
    assert champion["model_version"]["version"] == logged["version"]

    version = json.loads(_get(server, "/api/2.0/mlflow/model-versions/get", name=f"flywheel-{DOMAIN}", version=logged["version"]))
    tags = {t["key"]: t["value"] for t in version["model_version"]["tags"]}
    assert tags["flywheel.base_model_id"] == BASE_MODEL
    assert tags["flywheel.training_dataset_digest"] == "e" * 64
    assert tags["flywheel.gate"] == "passed"

    experiment = json.loads(_get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=f"flywheel-{DOMAIN}"))
    found = _post(
        server,
        "/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`flywheel.adapter_version` = '{logged['version']}'",
        },
    )
    assert [r["info"]["run_id"] for r in found["runs"]] == [logged["generation_run"]]
    run_tags = {t["key"]: t["value"] for t in found["runs"][0]["data"]["tags"]}
    assert run_tags["flywheel.produces.synthetic_set"] == logged["synthetic"]

    episodes = json.loads(
        _get(server, "/get-artifact", run_uuid=logged["generation_run"], path=runs.synthetic_set_artifact(logged["synthetic"]))
    )
    assert episodes["episodes"] == [{"episode_id": "e0", "prompt": "wave", "seed": 3}]
