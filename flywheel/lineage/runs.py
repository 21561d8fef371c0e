"""Runs: one parent run per flywheel iteration (or experiment), one child run per asset materialization.

All are found-or-created by a deterministic key, so re-running a materialization (a Dagster retry, a
re-execution of the same partition at the same code version) reuses its run instead of adding one:

    iteration run   tag flywheel.iteration_key = "<domain>/<iteration>"           (flywheel.kind = iteration)
    experiment run  tag flywheel.iteration_key = "<domain>/experiment/<run id>"   (flywheel.kind = experiment)
    step run        tag flywheel.step_key      = caller's key (e.g. "<asset>/<partition>/<input hash>")

Tags on every run: flywheel.kind, flywheel.domain, flywheel.iteration (numbered iterations only),
flywheel.code_version, dagster.run_id (latest attempt); step runs add flywheel.asset, flywheel.partition,
flywheel.step_key and mlflow.parentRunId (the UI nests them under the iteration).

Every RUNNING run names the process that keeps it running: flywheel.host, flywheel.pid_ns (the pid
namespace: containers sharing a hostname do not judge each other's pids), flywheel.pid and
flywheel.pid_start (the process's start time, so a reused pid is not mistaken for it). `owner_alive` reads
them; flywheel.lineage.recorder closes the runs of processes that died.

Datasets are logged as MLflow dataset inputs carrying OUR content digests (the sha256 of the
artifact in the flywheel store), not MLflow's computed ones. MLflow's digest column holds 36
characters, so the dataset digest is the first 32 hex digits and the full digest rides along as the
input tag `flywheel.digest`. What a step *produces* is logged the same way with context "output"
and is also named by run tags (`flywheel.produces.<kind>`), which queries search on.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.lineage import tracking
from flywheel.lineage.tracking import (
    TAG_ASSET,
    TAG_CODE_VERSION,
    TAG_DAGSTER_RUN_ID,
    TAG_DOMAIN,
    TAG_ITERATION,
    TAG_ITERATION_KEY,
    TAG_KIND,
    TAG_PARENT_RUN,
    TAG_PARTITION,
    TAG_RUN_NAME,
    TAG_STEP_KEY,
)
from flywheel.store import resolve_home

DATASET_KINDS = ("demonstrations", "clips", "synthetic_set", "dataset_version", "evaluation", "other")
DIGEST_TAG = "flywheel.digest"
KIND_TAG = "flywheel.dataset_kind"
PRODUCES_TAG = "flywheel.produces."  # + dataset kind -> full digest
ADAPTER_MODEL_TAG = "flywheel.adapter_model"
ADAPTER_VERSION_TAG = "flywheel.adapter_version"
ADAPTER_MODEL_ID_TAG = "flywheel.adapter_model_id"
SYNTHETIC_SETS_TAG = "flywheel.synthetic_sets"  # comma-separated full digests a dataset version folds in
LINEAGE_ARTIFACT_DIR = "lineage"
MLFLOW_DIGEST_LEN = 32
TAG_HOST = "flywheel.host"
TAG_PID = "flywheel.pid"
TAG_PID_NS = "flywheel.pid_ns"
TAG_PID_START = "flywheel.pid_start"
ENV_PACKAGES = ("torch", "diffusers", "peft", "transformers", "lerobot", "dagster", "mlflow", "flywheel")


@dataclass
class StepRun:
    """An MLflow run of one flywheel step: log to it with plain Python values."""

    home: Path
    run_id: str
    experiment_id: str
    domain: str
    reused: bool = False

    @property
    def client(self):
        return tracking.client(self.home)

    @property
    def url(self) -> str:
        return tracking.run_url(self.home, self.experiment_id, self.run_id)

    def links(self) -> dict[str, str]:
        """For Dagster asset metadata: where this materialization's MLflow run is."""
        return {"mlflow_run_id": self.run_id, "mlflow_experiment_id": self.experiment_id, "mlflow_run_url": self.url}

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        """Params are write-once in MLflow: a reused run accepts the same values again, not new ones."""
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        new = {k: _param_value(v) for k, v in _flatten(params).items()}
        clashes = {k: (existing[k], v) for k, v in new.items() if k in existing and existing[k] != v}
        if clashes:
            raise ValueError(
                f"run {self.run_id} already has different values for params {sorted(clashes)} "
                f"(old, new): {clashes}; a changed config needs a new step key"
            )
        todo = [Param(k, v) for k, v in new.items() if k not in existing]
        for start in range(0, len(todo), 100):
            self.client.log_batch(self.run_id, params=todo[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_step_metrics(self, records: Iterable[dict[str, Any]]) -> None:
        """Log per-step records like {"step": 3, "loss": 0.21, "samples_per_s": 5.1} in batches."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for record in records:
            if "step" not in record:
                raise ValueError(f"step metric record {record!r} has no 'step' field; add the training step")
            step = int(record["step"])
            batch += [Metric(k, float(v), now, step) for k, v in record.items() if k != "step" and _is_number(v)]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def progress_callback(self, every: int = 1) -> Callable[[dict], None]:
        """A `progress` callback for long work: numeric fields of events with a 'step' become metrics."""
        pending: list[dict] = []

        def progress(event: dict) -> None:
            if "step" not in event:
                return
            pending.append(event)
            if len(pending) >= every or event.get("done"):
                self.log_step_metrics(pending)
                pending.clear()

        return progress

    def log_environment(self) -> dict[str, str]:
        env = environment()
        self.set_tags({f"flywheel.env.{k}": v for k, v in env.items()})
        return env

    def log_resource_usage(self) -> dict[str, float]:
        usage = resource_usage()
        self.log_metrics(usage)
        return usage

    def log_dataset_input(self, name: str, digest: str, source: str, kind: str, **details) -> None:
        log_dataset_input(self, name, digest, source, kind, **details)

    def log_dataset_output(self, name: str, digest: str, source: str, kind: str, **details) -> None:
        log_dataset_input(self, name, digest, source, kind, context="output", **details)
        self.set_tags({PRODUCES_TAG + kind: digest})

    def log_json_artifact(self, relpath: str, payload: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(relpath).name
            path.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
            parent = str(Path(relpath).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def load_json_artifact(self, relpath: str) -> Any:
        return load_run_json(self.home, self.run_id, relpath)


def start_iteration_run(
    home, domain: str, iteration: int, dagster_run_id: str | None = None, code_version: str | None = None,
    owner_pid: int | None = None,
) -> str:
    """The parent run of one flywheel iteration of a domain (found or created, marked RUNNING); returns its id."""
    tags = {TAG_KIND: "iteration", TAG_ITERATION: str(int(iteration)),
            TAG_RUN_NAME: f"{domain} iteration {int(iteration)}"}
    return _start_parent_run(home, domain, f"{domain}/{int(iteration)}", tags, dagster_run_id, code_version, owner_pid)


def start_experiment_run(
    home, domain: str, dagster_run_id: str, code_version: str | None = None, owner_pid: int | None = None,
    label: str = "",
) -> str:
    """The parent run of an experiment: a Dagster run of part of the job (e.g. one asset re-materialized). It
    has no iteration number; its steps nest under it like an iteration's."""
    name = f"{domain} experiment {dagster_run_id[:8]}" + (f": {label}" if label else "")
    tags = {TAG_KIND: "experiment", TAG_RUN_NAME: name[:250]}
    return _start_parent_run(home, domain, f"{domain}/experiment/{dagster_run_id}", tags, dagster_run_id,
                             code_version, owner_pid)


def _start_parent_run(home, domain, key, tags, dagster_run_id, code_version, owner_pid) -> str:
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
    tags = {**tags, TAG_DOMAIN: domain, TAG_ITERATION_KEY: key, **owner_tags(owner_pid)}
    if dagster_run_id:
        tags[TAG_DAGSTER_RUN_ID] = dagster_run_id
    if code_version:
        tags[TAG_CODE_VERSION] = code_version
    run_id, reused = _find_or_create_run(home, mlflow_client, experiment_id, TAG_ITERATION_KEY, key, tags)
    if reused and mlflow_client.get_run(run_id).info.status != "RUNNING":
        mlflow_client.update_run(run_id, status="RUNNING")
    return run_id


def finish_iteration_run(home, run_id: str, status: str = "FINISHED") -> None:
    tracking.client(home).set_terminated(run_id, status)


def owner_tags(pid: int | None = None) -> dict[str, str]:
    """Tags naming the process that keeps a run RUNNING (default: this one)."""
    pid = os.getpid() if pid is None else int(pid)
    return {TAG_HOST: socket.gethostname(), TAG_PID_NS: _pid_namespace(), TAG_PID: str(pid),
            TAG_PID_START: _process_start(pid) or ""}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process a run's tags name is still running: None when this process cannot tell (no owner
    recorded, another host's or another pid namespace's process)."""
    pid, host = tags.get(TAG_PID), tags.get(TAG_HOST)
    if not pid or not pid.isdigit() or host != socket.gethostname() or tags.get(TAG_PID_NS, "") != _pid_namespace():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    recorded = tags.get(TAG_PID_START)
    return not recorded or _process_start(int(pid)) == recorded


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), where /proc exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


@contextlib.contextmanager
def step_run(
    home,
    parent_run_id: str | None,
    asset: str,
    domain: str,
    dagster_run_id: str | None,
    step_key: str,
    code_version: str | None = None,
    partition: str | None = None,
    log_environment: bool = True,
) -> Iterator[StepRun]:
    """Child run of one asset materialization, found or created by `step_key`.

    Finished as FINISHED on success, FAILED on an error, KILLED when interrupted (Ctrl-C, SIGTERM, a run
    cancelled: anything raised that is not an Exception); the error is re-raised. Peak memory and wall time
    are logged either way. `partition` defaults to the domain (flywheel partitions assets by domain).
    """
    run = open_step_run(home, parent_run_id, asset, domain, dagster_run_id, step_key, code_version, partition)
    if log_environment:
        run.log_environment()
    started = time.perf_counter()
    status = "KILLED"
    try:
        yield run
        status = "FINISHED"
    except Exception:
        status = "FAILED"
        raise
    finally:
        run.log_metrics({"wall_time_s": time.perf_counter() - started, **resource_usage()})
        run.client.set_terminated(run.run_id, status)


def open_step_run(
    home,
    parent_run_id: str | None,
    asset: str,
    domain: str,
    dagster_run_id: str | None,
    step_key: str,
    code_version: str | None = None,
    partition: str | None = None,
) -> StepRun:
    """Find or create a step's run and mark it RUNNING (the context-manager-free form of `step_run`)."""
    if not step_key:
        raise ValueError("step_key is empty: pass a deterministic key (asset, partition, input hash)")
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
    tags = {
        TAG_KIND: "step",
        TAG_DOMAIN: domain,
        TAG_ASSET: asset,
        TAG_PARTITION: partition or domain,
        TAG_STEP_KEY: step_key,
        TAG_RUN_NAME: f"{asset} [{partition or domain}]",
        **owner_tags(),
    }
    if parent_run_id:
        parent = mlflow_client.get_run(parent_run_id)
        tags[TAG_PARENT_RUN] = parent_run_id
        if TAG_ITERATION in parent.data.tags:
            tags[TAG_ITERATION] = parent.data.tags[TAG_ITERATION]
    if dagster_run_id:
        tags[TAG_DAGSTER_RUN_ID] = dagster_run_id
    if code_version:
        tags[TAG_CODE_VERSION] = code_version
    run_id, reused = _find_or_create_run(home, mlflow_client, experiment_id, TAG_STEP_KEY, step_key, tags)
    if reused:
        mlflow_client.update_run(run_id, status="RUNNING")
    return StepRun(home=home, run_id=run_id, experiment_id=experiment_id, domain=domain, reused=reused)


def open_run(home, run_id: str) -> StepRun:
    """A handle on an existing run by id (e.g. passed to a subprocess through its environment)."""
    home = resolve_home(home)
    run = tracking.client(home).get_run(run_id)
    domain = run.data.tags.get(TAG_DOMAIN, "")
    return StepRun(home=home, run_id=run_id, experiment_id=run.info.experiment_id, domain=domain, reused=True)


def _find_or_create_run(home, mlflow_client, experiment_id, key_tag, key, tags) -> tuple[str, bool]:
    """Search-then-create under a per-key lock, so concurrent callers with one key get one run."""
    from mlflow.entities import RunTag

    with tracking.file_lock(home, f"run-{key}"):
        found = find_runs(mlflow_client, [experiment_id], {key_tag: key})
        if found:
            run = found[-1]  # oldest: the first one ever created for this key
            mutable = {k: v for k, v in tags.items() if run.data.tags.get(k) != v and k != TAG_RUN_NAME}
            if mutable:
                mlflow_client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in mutable.items()])
            return run.info.run_id, True
        run = mlflow_client.create_run(experiment_id, tags=tags, run_name=tags.get(TAG_RUN_NAME))
        return run.info.run_id, False


def find_runs(mlflow_client, experiment_ids: list[str], tags: dict[str, str], max_results: int = 1000) -> list:
    """Runs whose tags equal all of `tags`, newest first."""
    clauses = [f"tags.`{k}` = '{_quote(v)}'" for k, v in tags.items()]
    return list(
        mlflow_client.search_runs(
            experiment_ids, " and ".join(clauses), max_results=max_results, order_by=["attributes.start_time DESC"]
        )
    )


def log_dataset_input(
    run: StepRun,
    name: str,
    digest: str,
    source: str,
    kind: str,
    schema: dict | None = None,
    profile: dict | None = None,
    context: str = "training",
) -> None:
    """Log a dataset as an MLflow dataset input of `run`, identified by our content digest.

    `source` is where the data lives (a path under the flywheel home or a URI); `kind` is one of
    DATASET_KINDS; `schema` (e.g. LeRobot features) and `profile` (counts, fps) are shown in the UI.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset kind {kind!r} is not one of {DATASET_KINDS}")
    if not digest or len(digest) < 8:
        raise ValueError(f"dataset {name!r}: digest {digest!r} is not a content digest (hash_tree/hash_json)")
    source_type = "http" if str(source).startswith(("http://", "https://")) else "local"
    dataset = Dataset(
        name=name,
        digest=digest[:MLFLOW_DIGEST_LEN],
        source_type=source_type,
        source=json.dumps({"uri" if source_type == "local" else "url": str(source)}),
        schema=json.dumps(schema, sort_keys=True, default=str) if schema else None,
        profile=json.dumps({"kind": kind, **(profile or {})}, sort_keys=True, default=str),
    )
    tags = [InputTag("mlflow.data.context", context), InputTag(DIGEST_TAG, digest), InputTag(KIND_TAG, kind)]
    run.client.log_inputs(run.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


def dataset_inputs(home, run_id: str) -> list[dict[str, Any]]:
    """A run's datasets as plain dicts: name, digest (full), kind, context, source, profile."""
    run = tracking.client(home).get_run(run_id)
    out = []
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        out.append(
            {
                "name": item.dataset.name,
                "digest": tags.get(DIGEST_TAG, item.dataset.digest),
                "kind": tags.get(KIND_TAG, ""),
                "context": tags.get("mlflow.data.context", ""),
                "source": json.loads(item.dataset.source or "{}"),
                "profile": json.loads(item.dataset.profile or "{}"),
            }
        )
    return out


def log_synthetic_set(
    run: StepRun,
    domain: str,
    adapter_version: str | int | None,
    digest: str,
    source: str,
    episodes: list[dict[str, Any]],
    base_model_id: str | None = None,
) -> None:
    """Record that `run` generated a synthetic set with adapter `adapter_version` of `domain`.

    `episodes`: one record per generated episode with at least `episode_id`, `prompt`, `seed`
    (anything else, e.g. conditioning clip, is kept). Written as the run artifact
    lineage/synthetic_set-<digest[:16]>.json; the adapter's LoggedModel becomes a model input of the
    run, so the UI links the generation run to the adapter.
    """
    from mlflow.entities import LoggedModelInput

    from flywheel.lineage.registry import model_id_of

    missing = [i for i, e in enumerate(episodes) if not {"episode_id", "prompt", "seed"} <= set(e)]
    if missing:
        raise ValueError(f"synthetic set {digest[:16]}: episodes {missing[:5]} lack episode_id/prompt/seed")
    tags = {TAG_DOMAIN: domain}
    if adapter_version is not None:
        name = tracking.registered_model_name(domain)
        version = run.client.get_model_version(name, str(adapter_version))
        tags |= {ADAPTER_MODEL_TAG: name, ADAPTER_VERSION_TAG: str(version.version)}
        tags[ADAPTER_MODEL_ID_TAG] = model_id_of(version)
        run.client.log_inputs(run.run_id, models=[LoggedModelInput(tags[ADAPTER_MODEL_ID_TAG])])
    elif base_model_id:
        tags["flywheel.base_model_id"] = base_model_id
    run.set_tags(tags)
    run.log_dataset_output(
        "synthetic_set", digest, source, "synthetic_set", profile={"episodes": len(episodes), **tags}
    )
    run.log_json_artifact(
        synthetic_set_artifact(digest),
        {"digest": digest, "source": source, "adapter_version": tags.get(ADAPTER_VERSION_TAG), "episodes": episodes},
    )


def log_refreshed_dataset(
    run: StepRun,
    digest: str,
    source: str,
    synthetic_members: list[dict[str, Any]],
    name: str = "refreshed_dataset",
    profile: dict | None = None,
) -> None:
    """Record that `run` produced dataset version `digest` folding in synthetic episodes.

    `synthetic_members`: one record per synthetic episode in the new dataset:
    {"episode_index": <index in the refreshed dataset>, "synthetic_set_digest": ..., "episode_id": ...}.
    """
    bad = [m for m in synthetic_members if not {"episode_index", "synthetic_set_digest", "episode_id"} <= set(m)]
    if bad:
        raise ValueError(
            f"dataset version {digest[:16]}: members {bad[:3]} lack episode_index/synthetic_set_digest/episode_id"
        )
    sets = sorted({m["synthetic_set_digest"] for m in synthetic_members})
    for set_digest in sets:
        log_dataset_input(run, "synthetic_set", set_digest, source, "synthetic_set", context="input")
    run.set_tags({SYNTHETIC_SETS_TAG: ",".join(sets)})
    run.log_dataset_output(
        name, digest, source, "dataset_version", profile={"synthetic_episodes": len(synthetic_members), **(profile or {})}
    )
    run.log_json_artifact(dataset_version_artifact(digest), {"digest": digest, "members": synthetic_members})


def synthetic_set_artifact(digest: str) -> str:
    return f"{LINEAGE_ARTIFACT_DIR}/synthetic_set-{digest[:16]}.json"


def dataset_version_artifact(digest: str) -> str:
    return f"{LINEAGE_ARTIFACT_DIR}/dataset_version-{digest[:16]}.json"


def load_run_json(home, run_id: str, relpath: str) -> Any:
    import mlflow.artifacts

    tracking.ensure_tracking_store(home)
    uri = f"runs:/{run_id}/{relpath}"
    return json.loads(mlflow.artifacts.load_text(uri))


def environment() -> dict[str, str]:
    """Versions that decide reproducibility, and the accelerator (read only if torch is loaded)."""
    env = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for package in ENV_PACKAGES:
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    env["gpu"] = _gpu_name()
    return env


def _gpu_name() -> str:
    torch = sys.modules.get("torch")  # importing torch here would cost seconds on every step
    if torch is None:
        return "unknown (torch not loaded)"
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "none"


def resource_usage() -> dict[str, float]:
    usage = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        usage["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return usage


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]  # MLflow's param value limit


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _quote(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


__all__ = [
    "StepRun",
    "start_iteration_run",
    "start_experiment_run",
    "finish_iteration_run",
    "owner_tags",
    "owner_alive",
    "step_run",
    "open_step_run",
    "open_run",
    "log_dataset_input",
    "dataset_inputs",
    "log_synthetic_set",
    "log_refreshed_dataset",
    "environment",
    "find_runs",
]
