"""Adapters under governance: registered, versioned, gated, promoted and rolled back in MLflow.

Each adapter is an MLflow LoggedModel (artifacts = the adapter files, params = its card) registered
as a version of the domain's registered model `flywheel-<domain>`. Version tags carry the lineage:

    flywheel.adapter_digest           hash_tree of the adapter dir (the idempotency key)
    flywheel.base_model_id / flywheel.base_revision
    flywheel.training_dataset_digest  flywheel.parent_version (when continued from an adapter)
    flywheel.iteration  flywheel.method  flywheel.rank  flywheel.alpha  flywheel.code_version
    flywheel.eval.<metric> / flywheel.base_eval.<metric>   (record_evaluation)
    flywheel.gate                     passed | failed (last gate decision, JSON in flywheel.gate_decision)

Aliases: `candidate` moves to every newly registered version; `champion` moves only through
`promote` (refused unless the evaluation gate passed) and `rollback`. Every promotion, refusal and
rollback is a governance run (tag flywheel.kind=governance) in the domain's experiment, so the full
history stays browsable; the registered model's tag `flywheel.champion_history` mirrors the champion
stack (promote pushes, rollback pops) for a glance in the UI.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from flywheel.errors import NotFound
from flywheel.lineage import tracking
from flywheel.lineage.tracking import TAG_CODE_VERSION, TAG_DOMAIN, TAG_KIND, registered_model_name
from flywheel.store import hash_tree, resolve_home

CANDIDATE = "candidate"
CHAMPION = "champion"
ADAPTER_CARD = "adapter_card.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"

TAG_ADAPTER_DIGEST = "flywheel.adapter_digest"
TAG_BASE_MODEL = "flywheel.base_model_id"
TAG_BASE_REVISION = "flywheel.base_revision"
TAG_TRAINING_DATA = "flywheel.training_dataset_digest"
TAG_PARENT_VERSION = "flywheel.parent_version"
TAG_TRAINING_RUN = "flywheel.training_run_id"
TAG_MODEL_ID = "flywheel.model_id"
TAG_EVAL = "flywheel.eval."
TAG_BASE_EVAL = "flywheel.base_eval."
TAG_GATE = "flywheel.gate"
TAG_GATE_DECISION = "flywheel.gate_decision"
TAG_EVENT = "flywheel.event"
TAG_EVENT_NS = "flywheel.event_time_ns"
TAG_HISTORY = "flywheel.champion_history"
HISTORY_KEEP = 200  # registered-model tag values are capped at 5000 characters


def read_adapter_card(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: an adapter dir needs {ADAPTER_CARD} next to its weights")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rewrite it from the training run") from err
    base = card.get("base_model")
    if isinstance(base, dict):  # the training stage nests the base model's identity
        card.setdefault("base_model_id", base.get("model_id"))
        card.setdefault("base_revision", base.get("revision"))
    return card


def _card_field(card: dict, where: str, *names: str) -> Any:
    for name in names:
        if card.get(name) not in (None, ""):
            return card[name]
    raise ValueError(f"{where}: adapter card lacks {' or '.join(repr(n) for n in names)}; add it to {ADAPTER_CARD}")


def register_adapter(
    home,
    domain: str,
    adapter_dir: str | os.PathLike,
    card: dict | None,
    training_dataset_digest: str,
    iteration: int,
    parent_version: str | int | None = None,
    run_id: str | None = None,
    code_version: str | None = None,
) -> str:
    """Register an adapter dir as a version of `flywheel-<domain>`; returns the version ("1", "2", ...).

    Idempotent on the adapter's content digest: registering the same files again returns the
    existing version. `card` defaults to the dir's adapter_card.json. `code_version` defaults to the
    training run's flywheel.code_version tag.
    """
    home = resolve_home(home)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_WEIGHTS} not found: not an adapter dir (train one first)")
    card = card if card is not None else read_adapter_card(adapter_dir)
    where = str(adapter_dir / ADAPTER_CARD)
    digest = hash_tree(adapter_dir)
    name = registered_model_name(domain)
    mlflow_client = tracking.client(home)
    if run_id and not code_version:
        code_version = mlflow_client.get_run(run_id).data.tags.get(TAG_CODE_VERSION)
    tags = {
        TAG_DOMAIN: domain,
        TAG_ADAPTER_DIGEST: digest,
        TAG_BASE_MODEL: str(_card_field(card, where, "base_model_id", "model_id")),
        TAG_BASE_REVISION: str(_card_field(card, where, "base_revision", "revision")),
        TAG_TRAINING_DATA: training_dataset_digest,
        TAG_PARENT_VERSION: "" if parent_version is None else str(parent_version),
        "flywheel.iteration": str(int(iteration)),
        "flywheel.method": str(_card_field(card, where, "method")),
        "flywheel.rank": str(_card_field(card, where, "rank")),
        "flywheel.alpha": str(_card_field(card, where, "alpha")),
        TAG_CODE_VERSION: code_version or "unknown",
    }
    if run_id:
        tags[TAG_TRAINING_RUN] = run_id
    with tracking.file_lock(home, f"registry-{domain}"):
        _ensure_registered_model(mlflow_client, name, domain)
        existing = _versions_with_tag(mlflow_client, name, TAG_ADAPTER_DIGEST, digest)
        if existing:
            return str(existing[0].version)
        if parent_version is not None:
            mlflow_client.get_model_version(name, str(parent_version))  # fails clearly if it does not exist
        experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
        model = _log_adapter_model(mlflow_client, experiment_id, adapter_dir, card, tags, run_id, domain)
        version = mlflow_client.create_model_version(
            name,
            source=model.model_uri,
            run_id=run_id,
            tags=tags | {TAG_MODEL_ID: model.model_id},
            description=_describe(tags),
            model_id=model.model_id,
        )
        mlflow_client.set_registered_model_alias(name, CANDIDATE, version.version)
        return str(version.version)


def model_id_of(model_version) -> str:
    """The LoggedModel behind a model version (the sqlite registry leaves `model_id` empty)."""
    return model_version.model_id or model_version.tags.get(TAG_MODEL_ID) or model_version.source.removeprefix("models:/")


def _ensure_registered_model(mlflow_client, name: str, domain: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        description = f"LoRA/DoRA adapters of the Cosmos world model for domain `{domain}` (flywheel)."
        mlflow_client.create_registered_model(name, tags={TAG_DOMAIN: domain}, description=description)


def _log_adapter_model(mlflow_client, experiment_id, adapter_dir, card, tags, run_id, domain):
    from mlflow.entities import LoggedModelOutput

    params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in card.items() if not isinstance(v, dict)}
    model = mlflow_client.create_logged_model(
        experiment_id,
        name=f"{domain}-adapter-{tags[TAG_ADAPTER_DIGEST][:12]}",
        source_run_id=run_id,
        tags=tags,
        params={k: v[:6000] for k, v in params.items()},
        model_type="flywheel-adapter",
    )
    try:
        mlflow_client.log_model_artifacts(model.model_id, str(adapter_dir))
    except BaseException:
        mlflow_client.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow_client.finalize_logged_model(model.model_id, "READY")
    if run_id:
        # The training run lists the adapter among its outputs in the UI.
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model


def _describe(tags: dict[str, str]) -> str:
    parent = f"continued from version {tags[TAG_PARENT_VERSION]}" if tags[TAG_PARENT_VERSION] else "trained from the base model"
    return (
        f"{tags['flywheel.method']} rank {tags['flywheel.rank']} alpha {tags['flywheel.alpha']} on "
        f"`{tags[TAG_BASE_MODEL]}@{tags[TAG_BASE_REVISION]}`, {parent}; training data "
        f"`{tags[TAG_TRAINING_DATA][:16]}`, flywheel iteration {tags['flywheel.iteration']}, "
        f"code `{tags[TAG_CODE_VERSION]}`."
    )


def _versions_with_tag(mlflow_client, name: str, key: str, value: str) -> list:
    found = mlflow_client.search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    return sorted(found, key=lambda v: int(v.version))


def record_evaluation(home, domain: str, version: str | int, metrics: dict[str, float], base_metrics: dict[str, float]) -> None:
    """Store an adapter version's evaluation (and the base model's, on the same eval set) as version tags."""
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    for prefix, values in ((TAG_EVAL, metrics), (TAG_BASE_EVAL, base_metrics)):
        for key, value in values.items():
            mlflow_client.set_model_version_tag(name, str(version), prefix + key, repr(float(value)))


def evaluation_of(home, domain: str, version: str | int) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, base_metrics) recorded for a version by `record_evaluation`."""
    tags = tracking.client(home).get_model_version(registered_model_name(domain), str(version)).tags
    pick = lambda prefix: {k[len(prefix) :]: float(v) for k, v in tags.items() if k.startswith(prefix)}  # noqa: E731
    return pick(TAG_EVAL), pick(TAG_BASE_EVAL)


def champion_version(home, domain: str) -> str | None:
    return _alias_version(tracking.client(home), registered_model_name(domain), CHAMPION)


def _alias_version(mlflow_client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow_client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def apply_promotion(home, domain: str, version: str | int, decision) -> None:
    """Carry out an adapter gate decision (flywheel.decisions): record it on the version and as a governance
    run; move `champion` to the version only when it passed."""
    home = resolve_home(home)
    version = str(version)
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    mlflow_client.get_model_version(name, version)
    with tracking.file_lock(home, f"registry-{domain}"):
        previous = _alias_version(mlflow_client, name, CHAMPION)
        mlflow_client.set_model_version_tag(name, version, TAG_GATE, "passed" if decision.passed else "failed")
        mlflow_client.set_model_version_tag(name, version, TAG_GATE_DECISION, decision.model_dump_json()[:4900])
        if decision.passed:
            mlflow_client.set_registered_model_alias(name, CHAMPION, version)
        _record_event(home, mlflow_client, domain, "promote" if decision.passed else "promote-refused", version,
                      previous, decision)
        if decision.passed:
            _mirror_history(home, mlflow_client, domain)


def apply_rollback(home, domain: str, target: str | None, decision, reason: str = "") -> None:
    """Carry out a rollback decision: move `champion` to `target` when it passed; record it either way."""
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    with tracking.file_lock(home, f"registry-{domain}"):
        current = _alias_version(mlflow_client, name, CHAMPION)
        if decision.passed:
            mlflow_client.set_registered_model_alias(name, CHAMPION, target)
        _record_event(home, mlflow_client, domain, "rollback" if decision.passed else "rollback-refused",
                      target or "", current, decision, reason)
        if decision.passed:
            _mirror_history(home, mlflow_client, domain)


def record_import(home, domain: str, version: str, decision, source: str) -> None:
    """An `import` governance run: which file became which candidate version, and who imported it."""
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    with tracking.file_lock(home, f"registry-{domain}"):
        previous = _alias_version(mlflow_client, registered_model_name(domain), CHAMPION)
        _record_event(home, mlflow_client, domain, "import", version, previous, decision, f"imported from {source}")


def _record_event(home, mlflow_client, domain, event, version, previous, decision, reason="") -> str:
    """A governance run: the decision, its criteria (as metrics and params), the actor and the reason."""
    experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
    tags = {
        TAG_KIND: "governance",
        TAG_DOMAIN: domain,
        TAG_EVENT: event,
        TAG_EVENT_NS: str(time.time_ns()),
        "flywheel.version": version,
        "flywheel.previous_champion": previous or "",
        "flywheel.reason": reason,
        "flywheel.actor": getattr(decision, "actor", "") or os.environ.get("USER", "unknown"),
        "flywheel.user": os.environ.get("USER", "unknown"),
        "mlflow.note.content": (f"{event} {registered_model_name(domain)} v{version} (champion was {previous or 'none'})"
                                + (f"\n\n{decision.line()}" if decision is not None else "")),
    }
    if decision is not None:
        tags[TAG_GATE_DECISION] = decision.model_dump_json()[:4900]
        tags["flywheel.decision"] = "passed" if decision.passed else "refused"
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=f"{event} v{version}")
    if decision is not None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        metrics = [Metric(c.key, float(c.value), now, 0) for c in decision.criteria
                   if isinstance(c.value, (int, float)) and math.isfinite(float(c.value))]
        params = [Param(f"criterion.{c.key}", f"{c.rule}: {'ok' if c.passed else 'FAILED'}"[:6000])
                  for c in decision.criteria]
        mlflow_client.log_batch(run.info.run_id, metrics=metrics, params=params)
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def governance_history(home, domain: str) -> list[dict[str, str]]:
    """Every promote / refused promote / rollback of a domain, oldest first."""
    from flywheel.lineage.runs import find_runs

    mlflow_client = tracking.client(home)
    experiment = mlflow_client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        return []
    runs = find_runs(mlflow_client, [experiment.experiment_id], {TAG_KIND: "governance"}, max_results=10000)
    events = [
        {
            "event": r.data.tags[TAG_EVENT],
            "version": r.data.tags["flywheel.version"],
            "previous_champion": r.data.tags.get("flywheel.previous_champion", ""),
            "reason": r.data.tags.get("flywheel.reason", ""),
            "run_id": r.info.run_id,
            "time_ns": r.data.tags[TAG_EVENT_NS],
        }
        for r in runs
    ]
    return sorted(events, key=lambda e: int(e["time_ns"]))


def champion_stack(home, domain: str) -> list[str]:
    """Champions in order, replayed from history: promote pushes, rollback pops back to its target."""
    stack: list[str] = []
    for event in governance_history(home, domain):
        version = event["version"]
        if event["event"] == "promote" and (not stack or stack[-1] != version):
            stack.append(version)
        elif event["event"] == "rollback":
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:
                stack.append(version)
    return stack


def _mirror_history(home, mlflow_client, domain: str) -> None:
    stack = champion_stack(home, domain)[-HISTORY_KEEP:]
    mlflow_client.set_registered_model_tag(registered_model_name(domain), TAG_HISTORY, json.dumps(stack))


def resolve_adapter(home, domain: str, version: str | int | None = None) -> tuple[str, Path]:
    """(version, local adapter dir): the domain's champion unless `version` is given.

    A local file store's artifacts are used in place; remote ones are downloaded once into
    <home>/mlflow/downloads/flywheel-<domain>/v<version> and checked against the adapter digest.
    """
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    if version is None:
        version = _alias_version(mlflow_client, name, CHAMPION)
        if version is None:
            raise NotFound(f"{name} has no champion yet; promote a version (flywheel adapters promote) or pass a version")
    model_version = mlflow_client.get_model_version(name, str(version))
    location = mlflow_client.get_logged_model(model_id_of(model_version)).artifact_location
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        local = Path(unquote(urlparse(location).path))
        if (local / ADAPTER_WEIGHTS).is_file():
            return str(model_version.version), local
    return str(model_version.version), _download(home, name, model_version, location)


def _download(home: Path, name: str, model_version, location: str) -> Path:
    import mlflow.artifacts

    final = tracking.mlflow_dir(home) / "downloads" / name / f"v{model_version.version}"
    if (final / ADAPTER_WEIGHTS).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp))
        expected = model_version.tags.get(TAG_ADAPTER_DIGEST)
        if expected and hash_tree(tmp) != expected:
            raise ValueError(f"downloaded {name} v{model_version.version} does not match its adapter digest {expected[:16]}")
        os.rename(tmp, final)
    except OSError:
        if not (final / ADAPTER_WEIGHTS).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_adapters(home, domain: str | None = None) -> list[dict[str, Any]]:
    """Adapter versions (newest first) of one domain or of all, as plain dicts."""
    mlflow_client = tracking.client(home)
    filter_string = f"name = '{registered_model_name(domain)}'" if domain else "name LIKE 'flywheel-%'"
    models = {m.name: m for m in mlflow_client.search_registered_models(filter_string)}
    rows = []
    for model in models.values():
        aliases_by_version: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases_by_version.setdefault(str(version), []).append(alias)
        for version in mlflow_client.search_model_versions(f"name = '{model.name}'"):
            rows.append(_version_row(version, aliases_by_version.get(str(version.version), [])))
    return sorted(rows, key=lambda r: (r["domain"], -int(r["version"])))


def _version_row(version, aliases: list[str]) -> dict[str, Any]:
    tags = version.tags
    return {
        "domain": tags.get(TAG_DOMAIN, version.name.removeprefix("flywheel-")),
        "version": str(version.version),
        "aliases": sorted(aliases),
        "iteration": tags.get("flywheel.iteration", ""),
        "method": tags.get("flywheel.method", ""),
        "rank": tags.get("flywheel.rank", ""),
        "alpha": tags.get("flywheel.alpha", ""),
        "parent_version": tags.get(TAG_PARENT_VERSION, ""),
        "adapter_digest": tags.get(TAG_ADAPTER_DIGEST, ""),
        "training_dataset_digest": tags.get(TAG_TRAINING_DATA, ""),
        "base_model": f"{tags.get(TAG_BASE_MODEL, '')}@{tags.get(TAG_BASE_REVISION, '')}",
        "gate": tags.get(TAG_GATE, ""),
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(version.creation_timestamp / 1000)),
    }


def show_adapter(home, domain: str, version: str | int | None = None) -> dict[str, Any]:
    """Everything about one version (default: champion): tags, aliases, model id, runs, UI links."""
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    if version is None:
        version = _alias_version(mlflow_client, name, CHAMPION) or _alias_version(mlflow_client, name, CANDIDATE)
        if version is None:
            raise NotFound(f"{name} has no champion or candidate; register an adapter first")
    model_version = mlflow_client.get_model_version(name, str(version))
    aliases = list(model_version.aliases or [])
    metrics, base_metrics = evaluation_of(home, domain, version)
    return _version_row(model_version, aliases) | {
        "registered_model": name,
        "model_id": model_id_of(model_version),
        "training_run_id": model_version.run_id or "",
        "source": model_version.source,
        "tags": dict(model_version.tags),
        "eval": metrics,
        "base_eval": base_metrics,
        "url": tracking.model_version_url(home, domain, str(version)),
    }


def links_for_version(home, domain: str, version: str | int) -> dict[str, str]:
    """What the Dagster layer attaches to asset metadata to link a materialization to its model version."""
    return {
        "mlflow_registered_model": registered_model_name(domain),
        "mlflow_model_version": str(version),
        "mlflow_model_version_url": tracking.model_version_url(home, domain, str(version)),
    }
