"""`flywheel ui`: the Dagster UI (webserver + daemon) and, when lineage is in the build, the MLflow UI.

Both run on the flywheel home: DAGSTER_HOME=<home>/dagster (persistent runs, schedules, partitions) and the
MLflow store of flywheel.lineage.tracking. The embedded PushT sample is registered as the `pusht-rotated` domain on
first start, so a fresh UI has something to materialize. Ctrl-C stops both.

The terminal shows one line per server with its URL; the servers' own output goes to <home>/logs/<server>.log
(its last lines are printed if a server stops by itself). MLflow runs as one process (no uvicorn supervisor,
whose "Child process died" lines and worker restarts a local UI does not need), without its job-execution
workers (flywheel submits no MLflow jobs) and without telemetry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flywheel.store import resolve_home

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE = REPO_ROOT / "workspace.yaml"


def dagster_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "dagster", "dev", "-w", str(WORKSPACE), "-h", host, "-p", str(port)]


# What MLflow 3 reads (mlflow/environment_variables.py, mlflow/telemetry/utils.py).
MLFLOW_QUIET_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                    "DO_NOT_TRACK": "true"}
LOG_TAIL_LINES = 20


def mlflow_command(home: Path, port: int, host: str = "127.0.0.1") -> list[str] | None:
    """`mlflow ui` on the home's lineage store, or None when lineage is not in this build."""
    if importlib.util.find_spec("flywheel.lineage.tracking") is None:
        return None
    from flywheel.lineage import tracking

    uri = tracking.ensure_tracking_store(home)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    root = tracking.artifact_root(home)
    if root:
        cmd += ["--default-artifact-root", root]
    return cmd


def prepare_home(home: str | os.PathLike | None, gpus: int | None = None) -> tuple[Path, dict[str, str]]:
    """Create the Dagster instance of the home, register the sample domain; the env for the UI processes."""
    from flywheel.defs.instance import flywheel_instance, use_flywheel_instance
    from flywheel.defs.partitions import add_domain
    from flywheel.domains import SAMPLE_DOMAIN

    home = resolve_home(home)
    dagster_home = use_flywheel_instance(home, gpus)
    instance = flywheel_instance(home)
    try:
        from flywheel.defs.run_status import reap_dead_runs

        reap_dead_runs(instance, home)  # runs of processes killed earlier: ended, their gpu slots freed
        if not instance.get_dynamic_partitions("domain"):  # its demonstrations are the embedded sample
            add_domain(SAMPLE_DOMAIN, home=home, instance=instance)
    finally:
        instance.dispose()
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "FLYWHEEL_HOME": str(home),
           "DAGSTER_DISABLE_TELEMETRY": "1", "PYTHONPATH": os.pathsep.join(
               p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    return home, env


def start_ui(home: str | os.PathLike | None = None, port: int = 3000, mlflow_port: int = 5000,
             host: str = "127.0.0.1") -> int:
    """Start the Dagster UI (and the MLflow UI); block until Ctrl-C or one of them exits. Returns an exit code."""
    home, env = prepare_home(home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes: list[tuple[str, subprocess.Popen, Path]] = []
    mlflow = mlflow_command(home, mlflow_port, host)
    if mlflow:
        from flywheel.lineage.tracking import tracking_env

        from flywheel.lineage.tracking import record_ui_url

        env.update(tracking_env(home))  # every step process writes lineage to the store this UI shows
        env["FLYWHEEL_MLFLOW_UI_URL"] = f"http://{host}:{mlflow_port}"
        record_ui_url(home, host, mlflow_port)  # links printed later (flywheel adapters show) use this port
        processes.append(("mlflow", start_mlflow(mlflow, env, logs / "mlflow.log"), logs / "mlflow.log"))
    processes.append(("dagster", _start(dagster_command(port, host), env, logs / "dagster.log"), logs / "dagster.log"))
    print(f"Dagster UI  http://{host}:{port}")
    if mlflow:
        print(f"MLflow UI   http://{host}:{mlflow_port}")
    print(f"(home {home}; server logs in {logs}; Ctrl-C stops them)", flush=True)
    try:
        while True:
            for name, proc, log in processes:
                if proc.poll() is not None:
                    print(f"{name} exited with code {proc.returncode}; stopping the rest. The end of {log}:",
                          file=sys.stderr)
                    print(_tail(log), file=sys.stderr)
                    return proc.returncode or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        for _, proc, _ in processes:
            stop(proc)


def start_mlflow(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The MLflow UI server, quiet (MLFLOW_QUIET_ENV), its output appended to `log`."""
    return _start(command, {**env, **MLFLOW_QUIET_ENV}, log)


def _start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own handle
        return subprocess.Popen(command, env=env, cwd=REPO_ROOT, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    """SIGTERM the process group (dagster dev then stops its webserver, daemon and code servers); SIGKILL
    whatever is left of the group after `timeout_s` (a code server otherwise lingers until its heartbeat times out)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + (timeout_s if proc.returncode is not None else 0)
    while group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5  # killed processes are reaped by init asynchronously
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    proc.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
