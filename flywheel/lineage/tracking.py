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
MLflow UI shows a domain's iterations, steps, adapters and governance events side by side. They carry
`mlflow.experimentKind = custom_model_development`, so MLflow 3's UI opens them in its model-training
view (runs, models) instead of the GenAI one (traces).

A home can be copied or moved: the store's paths (artifact locations, adapter paths, dataset sources)
name the home they were written in, recorded in <home>/mlflow/location.json. The first process to open
the store at another path re-anchors them to the new home (`relocate_store`), so a copy reads and
writes its own files and never the original's.

`ensure_tracking_store(home)` must run once before parallel steps write: it creates or upgrades the
database schema under a file lock (MLflow's own lazy creation races when several processes open a
fresh sqlite file at once) and switches sqlite to WAL so readers never block writers.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from flywheel.store import HOME_ENV, atomic_write_bytes, resolve_home

# No phoning home from a pipeline library; users may still opt in by setting it to false.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Lineage reads small JSON artifacts; a progress bar per read only clutters CLI output and logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

URI_ENV = "FLYWHEEL_MLFLOW_URI"
MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"
ARTIFACT_ROOT_ENV = "FLYWHEEL_MLFLOW_ARTIFACT_ROOT"
UI_URL_ENV = "FLYWHEEL_MLFLOW_UI_URL"
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where `flywheel ui` / `mlflow ui` serve by default

MLFLOW_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
LOCKS_DIR = "locks"
LOCATION_FILE = "location.json"  # the absolute home the store's paths were written for
UI_FILE = "ui.json"  # the MLflow UI's URL, recorded by `flywheel ui` (record_ui_url)

# MLflow 3 picks the UI's view of an experiment from this tag (mlflow/server/js: ExperimentKind): the
# model-training one ("Machine learning": runs, models, datasets) rather than GenAI's traces and costs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

DOMAIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")

# Tag keys shared by runs, model versions and queries. Dotted, namespaced, stable: they are the
# lineage contract that queries, the CLI and the MLflow UI's search box rely on.
TAG_KIND = "flywheel.kind"  # iteration | experiment | step | governance
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
                if uri == _home_database_uri(home):
                    relocate_store(home)
                _ensure_default_experiment(uri, artifact_root(home))
        _ready_uris.add(uri)
    _point_mlflow_at(uri)
    return uri


def _home_database_uri(home: Path) -> str:
    return f"sqlite:///{mlflow_dir(home) / DB_FILE}"


def _ensure_default_experiment(uri: str, root: str | None) -> None:
    """MLflow's experiment 0 ("Default") under the home's artifact root, not `./mlruns` of whatever directory
    the first MLflow client happened to start in (MLflow's default root is relative to the working directory)."""
    if not root:
        return
    wanted = f"{root}/0"
    if uri.startswith("sqlite:///"):  # the common case, read without building a store: already right?
        with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=60)) as conn:
            row = conn.execute("SELECT artifact_location FROM experiments WHERE experiment_id = 0").fetchone()
        if row and row[0] == wanted:
            return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(uri, root)  # creates experiment 0 under `root` when the database has none
    try:
        default = store.get_experiment("0")
        if default.artifact_location != wanted and not store.search_runs(["0"], "", 0, max_results=1):
            with store.ManagedSessionMaker() as session:
                from mlflow.store.tracking.dbmodels.models import SqlExperiment

                session.query(SqlExperiment).filter(SqlExperiment.experiment_id == 0).update(
                    {SqlExperiment.artifact_location: wanted})
    finally:
        store.engine.dispose()


def relocate_store(home: str | os.PathLike | None = None) -> str | None:
    """Re-anchor the home's sqlite store to where the home is now; returns the old home when it moved.

    The store names files by absolute path (MLflow's artifact locations, flywheel's adapter paths and dataset
    sources). <home>/mlflow/location.json records the home they name; when the home was copied or moved, every
    such path under the old home is rewritten to the same place under this one, in one transaction. Call under
    the "schema" lock (ensure_tracking_store does).
    """
    home = resolve_home(home)
    db = mlflow_dir(home) / DB_FILE
    record = mlflow_dir(home) / LOCATION_FILE
    if not db.is_file():
        return None
    recorded = json.loads(record.read_text()).get("home") if record.is_file() else _home_named_by(db)
    moved = recorded if recorded and recorded != str(home) else None
    if moved:
        _rewrite_paths(db, moved, str(home))
    if moved or not record.is_file():
        atomic_write_bytes(record, (json.dumps({"home": str(home)}) + "\n").encode())
    return moved


# Every place the store keeps a path of the home: (table, column).
_PATH_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
    ("model_version_tags", "value"),
    ("datasets", "dataset_source"),
    ("tags", "value"),
    ("params", "value"),
)


def _home_named_by(db: Path) -> str | None:
    """The home a store without location.json was written for: read off a flywheel experiment's artifact root."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT artifact_location FROM experiments WHERE name LIKE 'flywheel-%'").fetchall()
    marker = f"/{MLFLOW_DIR}/{ARTIFACTS_DIR}/"
    for (location,) in rows:
        path = _local_path(location or "")
        if path and marker in path:
            return path.split(marker, 1)[0]
    return None


def _local_path(location: str) -> str | None:
    from urllib.parse import unquote, urlparse

    if location.startswith("file:"):
        return unquote(urlparse(location).path)
    return location if location.startswith("/") else None


def _rewrite_paths(db: Path, old: str, new: str) -> None:
    """Replace the old home by the new one wherever it starts a path: a file URI, a plain path, a path in JSON."""
    forms = {Path(old).as_uri(): Path(new).as_uri(), "file://" + old: "file://" + new, old: new}
    # Longest first, so a file URI is replaced whole; a form counts only where a path starts and ends with it.
    pattern = re.compile("|".join(rf"(?<![\w/.%-]){re.escape(o)}(?=/|\"|$)"
                                  for o in sorted(forms, key=len, reverse=True)))
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as conn, conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in _PATH_COLUMNS:
            if table not in tables:
                continue
            rows = conn.execute(f"SELECT rowid, {column} FROM {table} WHERE {column} LIKE ? OR {column} LIKE ?",
                                (f"%{old}%", f"%{Path(old).as_uri()}%")).fetchall()
            for rowid, value in rows:
                rebased = pattern.sub(lambda m: forms[m.group(0)], value)
                if rebased != value:
                    conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (rebased, rowid))


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
        if found.tags.get(TAG_EXPERIMENT_KIND) != EXPERIMENT_KIND:  # an experiment made before the tag existed
            mlflow_client.set_experiment_tag(found.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return found.experiment_id
    tags = {TAG_DOMAIN: domain, TAG_EXPERIMENT_KIND: EXPERIMENT_KIND,
            "mlflow.note.content": f"flywheel lineage for domain `{domain}`"}
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
    """Base URL of the MLflow UI for links: $FLYWHEEL_MLFLOW_UI_URL, else the tracking server, else the URL
    `flywheel ui` recorded in the home (record_ui_url), else `flywheel ui`'s default port."""
    chosen = os.environ.get(UI_URL_ENV)
    if chosen:
        return chosen.rstrip("/")
    uri = tracking_uri(home)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    recorded = mlflow_dir(home) / UI_FILE
    if recorded.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return str(json.loads(recorded.read_text())["url"]).rstrip("/")
    return DEFAULT_UI_URL


def record_ui_url(home: str | os.PathLike | None, host: str, port: int) -> str:
    """Remember where the MLflow UI of this home serves (`flywheel ui --mlflow-port`), for every later link.

    A wildcard bind address is recorded as 127.0.0.1 (a browser cannot open 0.0.0.0 everywhere)."""
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    url = f"http://{'[' + host + ']' if ':' in host else host}:{int(port)}"
    path = mlflow_dir(home) / UI_FILE
    atomic_write_bytes(path, (json.dumps({"url": url}) + "\n").encode())
    return url


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
