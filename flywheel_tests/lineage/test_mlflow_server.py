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
    """Adapters trained (one continuing another), gated, promoted, refused, rolled back, imported and used for
    generation, logged before the server starts."""
    from flywheel import decisions
    from flywheel.errors import DecisionRefused

    root = tmp_path_factory.mktemp("adapter")
    first = make_adapter(root / "a", seed=7)
    second = make_adapter(root / "b", seed=8, parent=first)  # training continued the first
    parent = runs.start_iteration_run(home, DOMAIN, 0, "dg-rest", "c1")
    versions = []
    for key, adapter, continued in (("a", first, None), ("b", second, "1")):
        with runs.step_run(home, parent, "adapter", DOMAIN, "dg-rest", f"adapter/rest/{key}", "c1", log_environment=False) as run:
            versions.append(registry.register_adapter(home, DOMAIN, adapter, None, "e" * 64, 0, parent_version=continued,
                                                      run_id=run.run_id))
    with pytest.raises(DecisionRefused):  # no evaluation yet
        decisions.promote_by_hand(home, DOMAIN, "1", decisions.AdapterGate(), "user t via `flywheel adapters promote`")
    with pytest.raises(DecisionRefused):  # no champion to roll back from
        decisions.rollback(home, DOMAIN, None, "user t via `flywheel adapters rollback`", reason="regressed")
    for version, psnr in (("1", 21.0), ("2", 21.2)):
        registry.record_evaluation(home, DOMAIN, version, {"psnr": psnr, "ssim": 0.9}, {"psnr": 20.0, "ssim": 0.9})
        decisions.promote_by_hand(home, DOMAIN, version, decisions.AdapterGate(), "iteration 0")
    imported, _ = decisions.import_adapter_version(home, DOMAIN, make_adapter(root / "ext", seed=9, external=True),
                                                   "user t via a test")
    synthetic = "5a" * 32
    with runs.step_run(home, parent, "synthetic", DOMAIN, "dg-rest", "synthetic/rest/0", "c1", log_environment=False) as run:
        runs.log_synthetic_set(run, DOMAIN, "1", synthetic, "/home/synthetic/5a", [{"episode_id": "e0", "prompt": "wave", "seed": 3}])
    cards = {"1": first, "2": second, imported: root / "ext"}
    return {"version": "2", "synthetic": synthetic, "generation_run": run.run_id, "cards": cards, "imported": imported}


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
            "filter": "tags.`flywheel.adapter_version` = '1'",
        },
    )
    assert [r["info"]["run_id"] for r in found["runs"]] == [logged["generation_run"]]
    run_tags = {t["key"]: t["value"] for t in found["runs"][0]["data"]["tags"]}
    assert run_tags["flywheel.produces.synthetic_set"] == logged["synthetic"]

    episodes = json.loads(
        _get(server, "/get-artifact", run_uuid=logged["generation_run"], path=runs.synthetic_set_artifact(logged["synthetic"]))
    )
    assert episodes["episodes"] == [{"episode_id": "e0", "prompt": "wave", "seed": 3}]


def test_the_experiment_opens_in_the_model_training_view(server, logged):
    experiment = json.loads(_get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=f"flywheel-{DOMAIN}"))
    tags = {t["key"]: t["value"] for t in experiment["experiment"]["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_every_version_and_its_logged_model_name_each_other_and_the_card(server, logged):
    name = f"flywheel-{DOMAIN}"
    listed = json.loads(_get(server, "/api/2.0/mlflow/model-versions/search", filter=f"name = '{name}'"))["model_versions"]
    assert sorted(v["version"] for v in listed) == sorted(logged["cards"])
    for item in listed:
        version = json.loads(_get(server, "/api/2.0/mlflow/model-versions/get", name=name, version=item["version"]))["model_version"]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        # version -> model: the source names the LoggedModel (MLflow's sqlite registry keeps no model_id column;
        # where a registry returns one, it is the same model)
        model_id = version["source"].removeprefix("models:/")
        assert version["source"] == f"models:/{model_id}" and model_id.startswith("m-")
        assert version.get("model_id", model_id) == model_id == tags["flywheel.model_id"]
        model = json.loads(_get(server, f"/api/2.0/mlflow/logged-models/{model_id}"))["model"]
        model_tags = {t["key"]: t["value"] for t in model["info"]["tags"]}
        # model -> version: what the UI's "Registered" column and the model page read
        assert {"name": name, "version": version["version"]} in json.loads(model_tags["mlflow.modelVersions"])
        assert model["info"].get("source_run_id", "") == version.get("run_id", "")
        # lineage tags: the card's, and only the card's
        card = json.loads((logged["cards"][version["version"]] / "adapter_card.json").read_text())
        assert tags["flywheel.rank"] == str(card["rank"]) and tags["flywheel.method"] == card["method"]
        assert tags["flywheel.base_revision"] == card["base_model"]["revision"]
        if card.get("lineage") == "external":
            assert (tags["flywheel.lineage"], tags["flywheel.source_sha256"]) == ("external", card["source"]["sha256"])
            assert tags["flywheel.parent_version"] == "" and "imported" in version["description"]
        elif card["parent_adapter"]:
            assert (tags["flywheel.lineage"], tags["flywheel.parent_version"]) == ("continued", "1")
            assert tags["flywheel.parent_weights_sha256"] == card["parent_adapter"]["weights_sha256"]
            assert "continued from version 1" in version["description"]
        else:
            assert (tags["flywheel.lineage"], tags["flywheel.parent_version"]) == ("trained", "")
            assert "trained from the base model" in version["description"]
        if version.get("run_id"):  # trained: the training run lists the model among its outputs, and its data
            run = json.loads(_get(server, "/api/2.0/mlflow/runs/get", run_id=version["run_id"]))["run"]
            assert model_id in [o["model_id"] for o in run.get("outputs", {}).get("model_outputs", [])]
            assert "training_data" in [d["dataset"]["name"] for d in run["inputs"]["dataset_inputs"]]


def test_refused_decisions_left_runs_with_their_reasons_and_actor(server, logged):
    experiment = json.loads(_get(server, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=f"flywheel-{DOMAIN}"))
    found = _post(server, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment"]["experiment_id"]],
        "filter": "tags.`flywheel.kind` = 'governance'", "max_results": 100})["runs"]
    events = {}
    for run in found:
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        events.setdefault(tags["flywheel.event"], []).append((run["info"]["status"], tags))
    assert sorted(events) == ["import", "promote", "promote-refused", "rollback-refused"]
    (status, promote), = events["promote-refused"]
    assert status == "FAILED" and promote["flywheel.decision"] == "refused"
    assert "recorded evaluation" in promote["flywheel.reasons"] and "flywheel adapters promote" in promote["flywheel.actor"]
    (status, rollback), = events["rollback-refused"]
    assert status == "FAILED" and "earlier champions" in rollback["flywheel.reasons"]
    assert rollback["flywheel.reason"] == "regressed" and "flywheel adapters rollback" in rollback["flywheel.actor"]
    assert [s for s, _ in events["promote"]] == ["FINISHED", "FINISHED"]
    (status, imported), = events["import"]
    assert status == "FINISHED" and imported["flywheel.version"] == logged["imported"]
