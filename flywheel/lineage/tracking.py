"""Where lineage lives: the MLflow tracking store of a flywheel home, and how every process reaches it.

Default store: an MLflow sqlite database and an artifact folder inside the flywheel home, by absolute
path, so every step process (Dagster op, Pipes subprocess, k8s pod on a shared volume) that is given
the same home writes to the same store:

    tracking URI   sqlite:///<abs home>/mlflow/mlflow.db
    artifact root  <abs home>/mlflow/artifacts

Override with $FLYWHEEL_MLFLOW_URI (or the standard $MLFLOW_TRACKING_URI), e.g. an `mlflow server`
backed by Postgres and an object store (docs/mlflow.md). $FLYWHEEL_MLFLOW_ARTIFACT_ROOT sets the
artifact root when the URI is a database URI; a tracking server decides its own artifact root.

Experiments: one per domain, named `flywheel-<domain>` like the domain's registered model, so the
MLflow UI shows a domain's iterations, steps, adapters and governance events side by side.

`ensure_tracking_store(home)` must run once before parallel steps write: it creates or upgrades the
database schema under a file lock (MLflow's own lazy creation races when several processes open a
fresh sqlite file at once) and switches sqlite to WAL so readers never block writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

from flywheel.store import HOME_ENV, resolve_home

# No phoning home from a pipeline library; users may still opt in by setting it to false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Lineage reads small JSON artifacts; a progress bar per read only clutters CLI output and logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

URI_ENV = "FLYWHEEL_MLFLOW_URI"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
ARTIFACT_ROOT_ENV = "FLYWHEEL_MLFLOW_ARTIFACT_ROOT"
UI_URL_ENV = "FLYWHEEL_MLFLOW_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default

MLFLOW_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOCKS_DIR = "locks"

DOMAIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")

# Tag keys shared by runs, model versions and queries. Dotted, namespaced, stable: they are the
# lineage contract that queries, the CLI and the MLflow UI's search box rely on.
TAG_KIND = "flywheel.kind"  # iteration | step | governance
TAG_DOMAIN = "flywheel.domain"
TAG_ITERATION = "flywheel.iteration"
TAG_ITERATION_KEY = "flywheel.iteration_key"
TAG_ASSET = "flywheel.asset"
TAG_PARTITION = "flywheel.partition"
TAG_STEP_KEY = "flywheel.step_key"
TAG_CODE_VERSION = "flywheel.code_version"
TAG_DAGSTER_RUN_ID = "dagster.run_id"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI folds children under it
TAG_RUN_NAME = "mlflow.runName"

_ready_uris: set[str] = set()


def experiment_name(domain: str) -> str:
    return f"flywheel-{check_domain(domain)}"


def registered_model_name(domain: str) -> str:
    return f"flywheel-{check_domain(domain)}"


def check_domain(domain: str) -> str:
    if not isinstance(domain, str) or not DOMAIN_PATTERN.match(domain):
        raise ValueError(
            f"invalid domain {domain!r}: use 1-64 lowercase letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (it names the MLflow experiment and registered model)"
        )
    return domain


def mlflow_dir(home: str | os.PathLike | None = None) -> Path:
    return resolve_home(home) / MLFLOW_DIR


def tracking_uri(home: str | os.PathLike | None = None) -> str:
    """$FLYWHEEL_MLFLOW_URI, else $MLFLOW_TRACKING_URI, else the home's sqlite database (absolute)."""
    chosen = os.environ.get(URI_ENV) or os.environ.get(MLFLOW_URI_ENV)
    if chosen:
        return chosen
    return f"sqlite:///{mlflow_dir(home) / DB_FILE}"


def artifact_root(home: str | os.PathLike | None = None) -> str | None:
    """Artifact root for new experiments; None when a tracking server decides it."""
    if not is_database_uri(tracking_uri(home)):
        return None
    chosen = os.environ.get(ARTIFACT_ROOT_ENV)
    if chosen:
        return chosen.rstrip("/")
    return (mlflow_dir(home) / ARTIFACTS_DIR).as_uri()


def is_database_uri(uri: str) -> bool:
    return uri.split(":", 1)[0].split("+", 1)[0] in _DB_SCHEMES


def tracking_env(home: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment to hand to every step process so they all write to the same store."""
    home = resolve_home(home)
    uri = tracking_uri(home)
    env = {HOME_ENV: str(home), URI_ENV: uri, MLFLOW_URI_ENV: uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    root = os.environ.get(ARTIFACT_ROOT_ENV)
    if root:
        env[ARTIFACT_ROOT_ENV] = root
    return env


@contextlib.contextmanager
def file_lock(home: str | os.PathLike | None, name: str) -> Iterator[None]:
    """An exclusive lock shared by every process using this home (flock on <home>/mlflow/locks/)."""
    path = mlflow_dir(home) / LOCKS_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:120]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_tracking_store(home: str | os.PathLike | None = None) -> str:
    """Create or upgrade the store's schema once, under a lock; point this process at it; return the URI.

    Call it before fanning out parallel steps. Cheap after the first call in a process.
    """
    home = resolve_home(home)
    uri = tracking_uri(home)
    if uri not in _ready_uris:
        if is_database_uri(uri):
            with file_lock(home, "schema"):
                _create_or_upgrade_schema(uri)
        _ready_uris.add(uri)
    _point_mlflow_at(uri)
    return uri


def _create_or_upgrade_schema(uri: str) -> None:
    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    engine = db_utils.create_sqlalchemy_engine_with_retry(uri)
    try:
        if uri.startswith("sqlite"):
            with engine.connect() as conn:
                # Persistent per database file: readers stop blocking the single writer.
                conn.execute(sqlalchemy.text("PRAGMA journal_mode=WAL"))
        if not db_utils._all_tables_exist(engine):
            db_utils._initialize_tables(engine)
        elif db_utils._get_schema_version(engine) != db_utils._get_latest_schema_revision():
            db_utils._upgrade_db(engine)
    finally:
        engine.dispose()


def _point_mlflow_at(uri: str) -> None:
    import mlflow

    # The registry resolves `models:/<id>` sources through the process-wide tracking URI. MLflow also
    # exports it to os.environ, where it would pass for the user's choice and override the next home's
    # default store in this process; flywheel hands step processes the URI itself (tracking_env).
    exported = {k: os.environ.get(k) for k in (MLFLOW_URI_ENV, "MLFLOW_REGISTRY_URI")}
    if mlflow.get_tracking_uri() != uri:
        mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in exported.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def client(home: str | os.PathLike | None = None) -> RetryingClient:
    """An MlflowClient for this home's store (schema ensured), retrying transient sqlite lock errors."""
    from mlflow import MlflowClient

    uri = ensure_tracking_store(home)
    return RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri))


def get_or_create_experiment(mlflow_client, home: str | os.PathLike | None, domain: str) -> str:
    """The domain's experiment id; created with the home's artifact root on first use (race-safe)."""
    from mlflow.exceptions import MlflowException

    name = experiment_name(domain)
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    tags = {TAG_DOMAIN: domain, "mlflow.note.content": f"flywheel lineage for domain `{domain}`"}
    root = artifact_root(home)
    location = f"{root}/{name}" if root else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=tags)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def flywheel_experiment_ids(mlflow_client) -> list[str]:
    """Every flywheel experiment in the store (one per domain)."""
    experiments = mlflow_client.search_experiments(filter_string=f"tags.`{TAG_DOMAIN}` != ''")
    return [e.experiment_id for e in experiments]


def ui_base_url(home: str | os.PathLike | None = None) -> str:
    """Base URL of the MLflow UI for links: $FLYWHEEL_MLFLOW_UI_URL, the tracking server, or `mlflow ui`."""
    chosen = os.environ.get(UI_URL_ENV)
    if chosen:
        return chosen.rstrip("/")
    uri = tracking_uri(home)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return DEFAULT_UI_URL


def run_url(home, experiment_id: str, run_id: str) -> str:
    return f"{ui_base_url(home)}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(home, domain: str, version: str) -> str:
    return f"{ui_base_url(home)}/#/models/{registered_model_name(domain)}/versions/{version}"


def _is_transient(err: Exception) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database is busy" in text or "temporarily_unavailable" in text


class RetryingClient:
    """MlflowClient whose calls retry when sqlite reports a lock.

    SQLite answers SQLITE_BUSY at once (without waiting out busy_timeout) when two transactions both
    try to upgrade a read lock to a write lock; MLflow rolls the transaction back, so a retry is safe.
    """

    attempts = 8

    def __init__(self, inner):
        self._inner = inner

    @property
    def inner(self):
        return self._inner

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            for attempt in range(self.attempts):
                try:
                    return attr(*args, **kwargs)
                except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
                    if attempt == self.attempts - 1 or not _is_transient(err):
                        raise
                    time.sleep(0.05 * 2**attempt)
            raise AssertionError("unreachable")

        return call
