"""`flywheel ui`'s MLflow server: one process, no job workers, no telemetry, its output in a log file."""

import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest

from flywheel.defs.ui import group_alive, mlflow_command, start_mlflow, stop

pytestmark = pytest.mark.multiprocess
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pgid=,args="], capture_output=True, text=True, check=True).stdout
    return [line.split(None, 1)[1] for line in out.splitlines() if line.split(None, 1)[0] == str(pgid)]


def test_mlflow_ui_runs_as_one_quiet_server(tmp_path):
    from flywheel.lineage.tracking import tracking_env

    home = tmp_path / "home"
    port = free_port()
    log = tmp_path / "mlflow.log"
    env = {**os.environ, **tracking_env(home)}
    env.pop("MLFLOW_DISABLE_TELEMETRY", None)  # the server must turn it off by itself
    proc = start_mlflow(mlflow_command(home, port), env, log)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        telemetry = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/3.0/mlflow/ui-telemetry",
                                                      timeout=10).read())
        assert telemetry["disable_ui_telemetry"] is True
        members = group_members(proc.pid)
        # `mlflow ui` and the single uvicorn server it starts: no worker processes, no job consumer.
        assert len(members) == 2 and any("uvicorn" in m and "--workers 1" in m for m in members), members
    finally:
        stop(proc)
    assert not group_alive(proc.pid)
    text = log.read_text()
    assert "Uvicorn running on" in text
    for noise in ("Child process", "Job executor", "huey", "job execution"):
        assert noise not in text, text[-3000:]
