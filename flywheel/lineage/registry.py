"""Adapters under governance: registered, versioned, gated, promoted and rolled back in MLflow.

Each adapter is an MLflow LoggedModel (artifacts = the adapter files, params = its card) registered
as a version of the domain's registered model `flywheel-<domain>`. The two are linked both ways, as
MLflow 3's UI reads it: the version's source is `models:/<model_id>` (its "Source model") and the
LoggedModel's tag `mlflow.modelVersions` lists its versions (its "Registered" column). MLflow's sqlite
registry has no model_id column, so `model_id` comes back empty from it; `model_id_of` reads the source.

Stored once: on a local artifact root the LoggedModel's files are hard links to the adapter's files in
the home's store (content-addressed, never modified), so the registry adds no second copy; on another
filesystem they are copied, to a server or object store uploaded.

Version tags carry the lineage, all of it read from the adapter card (the caller's claims are checked
against it):

    flywheel.lineage                  trained (from the base model) | continued (from an adapter) | external
    flywheel.adapter_digest           hash_tree of the adapter dir (the idempotency key)
    flywheel.weights_sha256           sha256 of the weights file (how a continued card names its parent)
    flywheel.base_model_id / flywheel.base_revision
    flywheel.training_dataset_digest  flywheel.parent_version (only when training continued an adapter)
    flywheel.source_format / flywheel.source_sha256 / flywheel.source_file   (external: what was imported)
    flywheel.iteration (numbered iterations only)  flywheel.method  flywheel.rank  flywheel.alpha
    flywheel.code_version
    flywheel.eval.<metric> / flywheel.base_eval.<metric>   (record_evaluation)
    flywheel.gate                     passed | failed (last gate decision, JSON in flywheel.gate_decision)

Aliases: `candidate` moves to every newly registered version; `champion` moves only through a passed
adapter gate (flywheel.decisions: automatic after evaluation, or `flywheel adapters promote`) and
`rollback`. Every governance decision -- promote, refused promote, rollback, refused rollback, import,
refused import -- is a governance run (tag flywheel.kind=governance) in the domain's experiment with the
decision, its criteria, the reasons and the actor; a refused one ends FAILED, so the UI shows it red. The
registered model's tag `flywheel.champion_history` mirrors the champion stack (promote pushes, rollback pops).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import IntegrityError
from flywheel.errors import NotFound
from flywheel.lineage import tracking
from flywheel.lineage.tracking import TAG_CODE_VERSION, TAG_DOMAIN, TAG_KIND, registered_model_name
from flywheel.store import hash_file, hash_tree, resolve_home

CANDIDATE = "candidate"
CHAMPION = "champion"
ADAPTER_CARD = "adapter_card.json"
ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"

TAG_LINEAGE = "flywheel.lineage"
TAG_ADAPTER_DIGEST = "flywheel.adapter_digest"
TAG_WEIGHTS_SHA = "flywheel.weights_sha256"
TAG_PARENT_WEIGHTS_SHA = "flywheel.parent_weights_sha256"
TAG_SOURCE_FORMAT = "flywheel.source_format"
TAG_SOURCE_SHA = "flywheel.source_sha256"
TAG_SOURCE_FILE = "flywheel.source_file"
TAG_ITERATION = "flywheel.iteration"
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
TAG_DECISION = "flywheel.decision"
TAG_REASONS = "flywheel.reasons"
TAG_ACTOR = "flywheel.actor"
TAG_MODEL_VERSIONS = "mlflow.modelVersions"  # LoggedModel tag MLflow's UI reads for "Registered" (mlflow_tags)
TAG_STORAGE = "flywheel.artifact_storage"  # LoggedModel tag: how its files are stored (hardlinks | copy | upload)
HISTORY_KEEP = 200  # registered-model tag values are capped at 5000 characters
TRAINED, CONTINUED, EXTERNAL = "trained", "continued", "external"


def read_adapter_card(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The card (flywheel.train.adapter_io.AdapterCard, the one reader) as a dict with its base model's identity
    also at the top level."""
    from flywheel.train.adapter_io import AdapterCard

    return _flat_base(AdapterCard.read(adapter_dir).model_dump(mode="json"))


def _flat_base(card: dict[str, Any]) -> dict[str, Any]:
    """The card with its nested base model identity (as the training stage writes it) also at the top."""
    base = card.get("base_model")
    if isinstance(base, dict):
        card = {**card, "base_model_id": card.get("base_model_id") or base.get("model_id"),
                "base_revision": card.get("base_revision") or base.get("revision")}
    return card


def _card_field(card: dict, where: str, *names: str) -> Any:
    for name in names:
        if card.get(name) not in (None, ""):
            return card[name]
    raise ValueError(f"{where}: adapter card lacks {' or '.join(repr(n) for n in names)}; add it to {ADAPTER_CARD}")


@dataclass(frozen=True)
class CardLineage:
    """Where an adapter came from, as its card says: the only source of a version's lineage tags."""

    kind: str                      # TRAINED | CONTINUED | EXTERNAL
    base_model_id: str
    base_revision: str
    method: str
    rank: str
    alpha: str
    parent_weights_sha256: str     # CONTINUED: the weights digest of the adapter training started from
    source: dict[str, Any]         # EXTERNAL: format, file, sha256 of what was imported

    @classmethod
    def of(cls, card: dict[str, Any], where: str) -> CardLineage:
        card = _flat_base(card)
        parent = card.get("parent_adapter")
        if card.get("lineage") == EXTERNAL:
            kind = EXTERNAL
        elif card.get("lineage") not in (None, "", TRAINED, CONTINUED):
            raise ValueError(f"{where}: lineage {card.get('lineage')!r} is not one of {TRAINED}, {CONTINUED}, "
                             f"{EXTERNAL}; fix {ADAPTER_CARD}")
        else:
            kind = CONTINUED if parent else TRAINED
        parent_sha = ""
        if kind == CONTINUED:
            parent_sha = str(parent.get("weights_sha256", "")) if isinstance(parent, dict) else ""
            if not parent_sha:
                raise ValueError(f"{where}: parent_adapter {parent!r} lacks weights_sha256; the card must name the "
                                 "adapter training continued by its weights digest")
        source = card.get("source") if isinstance(card.get("source"), dict) else {}
        if kind == EXTERNAL and not source.get("sha256"):
            raise ValueError(f"{where}: an external adapter's card must record its source's sha256 "
                             "(flywheel.train.adapter_import writes it)")
        return cls(kind=kind,
                   base_model_id=str(_card_field(card, where, "base_model_id", "model_id")),
                   base_revision=str(_card_field(card, where, "base_revision", "revision")),
                   method=str(_card_field(card, where, "method")),
                   rank=str(_card_field(card, where, "rank")),
                   alpha=f"{float(_card_field(card, where, 'alpha')):g}",
                   parent_weights_sha256=parent_sha, source=dict(source))


def register_adapter(
    home,
    domain: str,
    adapter_dir: str | os.PathLike,
    card: dict | None,
    training_dataset_digest: str | None,
    iteration: int | None,
    parent_version: str | int | None = None,
    run_id: str | None = None,
    code_version: str | None = None,
) -> str:
    """Register an adapter dir as a version of `flywheel-<domain>`; returns the version ("1", "2", ...).

    Idempotent on the adapter's content digest: registering the same files again returns the existing
    version. `card` defaults to the dir's adapter_card.json; the lineage tags come from it. `parent_version`
    may be given only when the card says training continued an adapter, and must be the version with that
    adapter's weights (default: found by them); `iteration` None = not a numbered iteration (an experiment,
    an import). `code_version` defaults to the training run's flywheel.code_version tag.
    """
    home = resolve_home(home)
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{adapter_dir / ADAPTER_WEIGHTS} not found: not an adapter dir (train one first)")
    card = card if card is not None else read_adapter_card(adapter_dir)
    where = str(adapter_dir / ADAPTER_CARD)
    lineage = CardLineage.of(card, where)
    digest = hash_tree(adapter_dir)
    name = registered_model_name(domain)
    mlflow_client = tracking.client(home)
    if run_id and not code_version:
        code_version = mlflow_client.get_run(run_id).data.tags.get(TAG_CODE_VERSION)
    tags = {
        TAG_DOMAIN: domain,
        TAG_LINEAGE: lineage.kind,
        TAG_ADAPTER_DIGEST: digest,
        TAG_WEIGHTS_SHA: hash_file(adapter_dir / ADAPTER_WEIGHTS),
        TAG_BASE_MODEL: lineage.base_model_id,
        TAG_BASE_REVISION: lineage.base_revision,
        TAG_TRAINING_DATA: training_dataset_digest or "",
        TAG_ITERATION: "" if iteration is None else str(int(iteration)),
        "flywheel.method": lineage.method,
        "flywheel.rank": lineage.rank,
        "flywheel.alpha": lineage.alpha,
        TAG_CODE_VERSION: code_version or "unknown",
    }
    if lineage.kind == EXTERNAL:
        tags |= {TAG_SOURCE_FORMAT: str(lineage.source.get("format", "")),
                 TAG_SOURCE_SHA: str(lineage.source["sha256"]), TAG_SOURCE_FILE: str(lineage.source.get("file", ""))}
    if run_id:
        tags[TAG_TRAINING_RUN] = run_id
    with tracking.file_lock(home, f"registry-{domain}"):
        _ensure_registered_model(mlflow_client, name, domain)
        existing = _versions_with_tag(mlflow_client, name, TAG_ADAPTER_DIGEST, digest)
        if existing:
            _link_model_to_version(mlflow_client, model_id_of(existing[0]), name, str(existing[0].version))
            return str(existing[0].version)
        tags[TAG_PARENT_VERSION] = _parent_version(mlflow_client, name, lineage, parent_version, where)
        if lineage.kind == CONTINUED:
            tags[TAG_PARENT_WEIGHTS_SHA] = lineage.parent_weights_sha256
        experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
        model = _log_adapter_model(mlflow_client, experiment_id, adapter_dir, card, tags, run_id, domain)
        version = mlflow_client.create_model_version(
            name,
            source=model.model_uri,
            run_id=run_id,
            tags=tags | {TAG_MODEL_ID: model.model_id},
            description=_describe(tags, lineage),
            model_id=model.model_id,
        )
        _link_model_to_version(mlflow_client, model.model_id, name, str(version.version))
        mlflow_client.set_registered_model_alias(name, CANDIDATE, version.version)
        if run_id:
            _link_model_to_training_data(home, mlflow_client, run_id, model.model_id, card, training_dataset_digest)
        return str(version.version)


def _parent_version(mlflow_client, name: str, lineage: CardLineage, claimed: str | int | None, where: str) -> str:
    """The registered version training continued, checked against the card; "" when there is none."""
    if lineage.kind != CONTINUED:
        if claimed is not None:
            origin = "imported" if lineage.kind == EXTERNAL else "trained from the base model"
            raise IntegrityError(f"{where}: the card says this adapter was {origin} (no parent_adapter), but "
                                 f"parent_version={claimed} was given; a parent is recorded only when training "
                                 "continued an adapter")
        return ""
    by_weights = _versions_with_tag(mlflow_client, name, TAG_WEIGHTS_SHA, lineage.parent_weights_sha256)
    if claimed is None:
        return str(by_weights[0].version) if by_weights else ""  # continued an adapter not registered here
    parent = mlflow_client.get_model_version(name, str(claimed))  # fails clearly if it does not exist
    recorded = parent.tags.get(TAG_WEIGHTS_SHA)
    if recorded and recorded != lineage.parent_weights_sha256:
        raise IntegrityError(f"{where}: parent_adapter has weights sha256 {lineage.parent_weights_sha256[:16]}..., "
                             f"but version {claimed} of {name} has {recorded[:16]}...; pass the version training "
                             "really continued (or none, to find it by its weights)")
    return str(parent.version)


def model_id_of(model_version) -> str:
    """The LoggedModel behind a model version: its source `models:/<model_id>` (MLflow's sqlite registry stores
    no model_id column, so the `model_id` field comes back empty from it)."""
    source = model_version.source or ""
    return model_version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else "") \
        or model_version.tags.get(TAG_MODEL_ID, "")


def _link_model_to_version(mlflow_client, model_id: str, name: str, version: str) -> None:
    """List the version on its LoggedModel, the way MLflow's `register_model` and its server do (the UI's
    "Registered" column and the model page's versions read this tag); idempotent."""
    model = mlflow_client.get_logged_model(model_id)
    listed = json.loads(model.tags.get(TAG_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": str(version)}
    if not any(str(e.get("version")) == entry["version"] and e.get("name") == name for e in listed):
        mlflow_client.set_logged_model_tags(model_id, {TAG_MODEL_VERSIONS: json.dumps(listed + [entry])})


def _link_model_to_training_data(home, mlflow_client, run_id: str, model_id: str, card: dict,
                                 training_dataset_digest: str | None) -> None:
    """The card's training numbers as metrics of the LoggedModel on its training data, so the model page lists
    the dataset and the dataset's runs list the model (MLflow links models to datasets through metrics)."""
    from mlflow.entities import Metric

    from flywheel.lineage import runs

    numbers = {k: float(card[k]) for k in ("final_loss", "last_step_loss", "steps")
               if isinstance(card.get(k), (int, float)) and not isinstance(card.get(k), bool)
               and math.isfinite(float(card[k]))}
    if not training_dataset_digest or not numbers:
        return
    source = next((str(home / kind / training_dataset_digest) for kind in ("latents", "clips")
                   if (home / kind / training_dataset_digest).is_dir()), f"flywheel:{training_dataset_digest}")
    run = runs.open_run(home, run_id)
    run.log_dataset_input("training_data", training_dataset_digest, source, "clips")
    now = int(time.time() * 1000)
    digest = training_dataset_digest[: runs.MLFLOW_DIGEST_LEN]
    mlflow_client.log_batch(run_id, metrics=[
        Metric(k, v, now, 0, model_id=model_id, dataset_name="training_data", dataset_digest=digest, run_id=run_id)
        for k, v in numbers.items()])


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
        storage = _store_adapter_files(mlflow_client, model, Path(adapter_dir))
        mlflow_client.set_logged_model_tags(model.model_id, {TAG_STORAGE: storage})
    except BaseException:
        mlflow_client.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow_client.finalize_logged_model(model.model_id, "READY")
    if run_id:
        # The training run lists the adapter among its outputs in the UI.
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model


def _store_adapter_files(mlflow_client, model, adapter_dir: Path) -> str:
    """The adapter's files as the LoggedModel's artifacts, stored once: hard links to the home's immutable store
    files when the artifact root is a local folder on the same filesystem; a copy on another filesystem; an
    upload to a server or object store. Returns which."""
    location = model.artifact_location
    if not location.startswith("file:"):
        mlflow_client.log_model_artifacts(model.model_id, str(adapter_dir))
        return "upload"
    target = Path(tracking._local_path(location))
    how = set()
    for source in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        dest = target / source.relative_to(adapter_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        how.add(link_or_copy(source, dest))
    return "hardlinks" if how <= {"hardlinks"} else "copy"


def link_or_copy(source: str | os.PathLike, dest: str | os.PathLike) -> str:
    """Hard-link an immutable file (no second copy on disk); copy it where the filesystem cannot link. Usable
    as shutil.copytree's copy_function."""
    try:
        os.link(source, dest)
        return "hardlinks"
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
    shutil.copy2(source, dest)  # another filesystem (FLYWHEEL_MLFLOW_ARTIFACT_ROOT) or no hard links there
    return "copy"


def _describe(tags: dict[str, str], lineage: CardLineage) -> str:
    """The version's description, in the card's words."""
    base = f"`{tags[TAG_BASE_MODEL]}@{tags[TAG_BASE_REVISION]}`"
    head = f"{tags['flywheel.method']} rank {tags['flywheel.rank']} alpha {tags['flywheel.alpha']} on {base}"
    if lineage.kind == EXTERNAL:
        source = lineage.source
        origin = (f"imported (lineage external) from a {source.get('format', '?')} file `{source.get('file', '?')}` "
                  f"sha256 `{str(source.get('sha256'))[:16]}`, alpha from "
                  f"{source.get('alpha_from') or 'its metadata'}; its training data is not known")
    else:
        if lineage.kind == CONTINUED:
            parent = (f"version {tags[TAG_PARENT_VERSION]}" if tags[TAG_PARENT_VERSION]
                      else "an adapter not registered here")
            origin = f"continued from {parent} (weights `{lineage.parent_weights_sha256[:16]}`)"
        else:
            origin = "trained from the base model"
        data = tags[TAG_TRAINING_DATA]
        origin += f" on training data `{data[:16]}`" if data else ""
    made = (f"flywheel iteration {tags[TAG_ITERATION]}" if tags[TAG_ITERATION] else
            "outside a numbered iteration" if lineage.kind != EXTERNAL else "imported")
    return f"{head}, {origin}; {made}, code `{tags[TAG_CODE_VERSION]}`."


def _versions_with_tag(mlflow_client, name: str, key: str, value: str) -> list:
    found = mlflow_client.search_model_versions(f"name = '{name}' and tags.`{key}` = '{value}'")
    return sorted(found, key=lambda v: int(v.version))


def record_evaluation(home, domain: str, version: str | int, metrics: dict[str, float],
                      base_metrics: dict[str, float], run_id: str | None = None) -> None:
    """Store an adapter version's evaluation (and the base model's, on the same eval set) as version tags, and
    the adapter's numbers as metrics of its LoggedModel, logged to `run_id` (the evaluation's run; default:
    the training run) so the model page shows them."""
    from mlflow.entities import Metric

    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    for prefix, values in ((TAG_EVAL, metrics), (TAG_BASE_EVAL, base_metrics)):
        for key, value in values.items():
            mlflow_client.set_model_version_tag(name, str(version), prefix + key, repr(float(value)))
    model_version = mlflow_client.get_model_version(name, str(version))
    run_id = run_id or model_version.run_id
    if run_id:
        now = int(time.time() * 1000)
        mlflow_client.log_batch(run_id, metrics=[
            Metric(f"eval.{k}", float(v), now, 0, model_id=model_id_of(model_version), run_id=run_id)
            for k, v in metrics.items() if math.isfinite(float(v))])


def evaluation_of(home, domain: str, version: str | int) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, base_metrics) recorded for a version by `record_evaluation`."""
    tags = tracking.client(home).get_model_version(registered_model_name(domain), str(version)).tags
    pick = lambda prefix: {k[len(prefix) :]: float(v) for k, v in tags.items() if k.startswith(prefix)}  # noqa: E731
    return pick(TAG_EVAL), pick(TAG_BASE_EVAL)


def line_base_model(home, domain: str) -> str | None:
    """`<model id>@<revision>` the domain's adapter line is built on (its champion's, else its newest version's);
    None while it has no version."""
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    version = _alias_version(mlflow_client, name, CHAMPION)
    if version is None:
        found = mlflow_client.search_model_versions(f"name = '{name}'")
        if not found:
            return None
        version = str(max(int(v.version) for v in found))
    tags = mlflow_client.get_model_version(name, version).tags
    return f"{tags.get(TAG_BASE_MODEL, '')}@{tags.get(TAG_BASE_REVISION, '')}"


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


def apply_promotion(home, domain: str, version: str | int, decision) -> str:
    """Carry out an adapter gate decision (flywheel.decisions): record it on the version and as a governance
    run; move `champion` to the version only when it passed. Returns the governance run's id."""
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
        run_id = _record_event(home, mlflow_client, domain, "promote" if decision.passed else "promote-refused",
                               version, previous, decision)
        if decision.passed:
            _mirror_history(home, mlflow_client, domain)
        return run_id


def apply_rollback(home, domain: str, target: str | None, decision, reason: str = "") -> str:
    """Carry out a rollback decision: move `champion` to `target` when it passed; record it either way.
    Returns the governance run's id."""
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    name = registered_model_name(domain)
    with tracking.file_lock(home, f"registry-{domain}"):
        current = _alias_version(mlflow_client, name, CHAMPION)
        if decision.passed:
            mlflow_client.set_registered_model_alias(name, CHAMPION, target)
        run_id = _record_event(home, mlflow_client, domain, "rollback" if decision.passed else "rollback-refused",
                               target or "", current, decision, reason)
        if decision.passed:
            _mirror_history(home, mlflow_client, domain)
        return run_id


def apply_import(home, domain: str, adapter_dir: str | os.PathLike, decision, reason: str = "") -> str | None:
    """Carry out an import decision: register the imported adapter dir (lineage external, no iteration, no
    training data) as the domain's newest candidate when it passed; record an `import` / `import-refused`
    governance run either way. Returns the version, or None when refused."""
    home = resolve_home(home)
    mlflow_client = tracking.client(home)
    version = None
    if decision.passed:
        version = register_adapter(home, domain, adapter_dir, None, None, None)
    current = _alias_version(mlflow_client, registered_model_name(domain), CHAMPION)
    _record_event(home, mlflow_client, domain, "import" if decision.passed else "import-refused", version or "",
                  current, decision, reason)
    return version


def _record_event(home, mlflow_client, domain, event, version, previous, decision, reason="") -> str:
    """A governance run: the decision, its criteria (as metrics and params), the reasons, the actor and the
    user's reason. A refused decision ends FAILED (red in the UI); the run lists the version's LoggedModel
    among its inputs, so the model page shows its governance history."""
    from mlflow.entities import LoggedModelInput, Metric, Param

    experiment_id = tracking.get_or_create_experiment(mlflow_client, home, domain)
    user = os.environ.get("USER", "unknown")
    refused = decision is not None and not decision.passed
    tags = {
        TAG_KIND: "governance",
        TAG_DOMAIN: domain,
        TAG_EVENT: event,
        TAG_EVENT_NS: str(time.time_ns()),
        "flywheel.version": version,
        "flywheel.previous_champion": previous or "",
        "flywheel.reason": reason,
        TAG_ACTOR: getattr(decision, "actor", "") or f"user {user}",
        "flywheel.user": user,
        "mlflow.user": user,
        "mlflow.note.content": (f"{event} {registered_model_name(domain)} "
                                + (f"v{version}" if version else "(no version)")
                                + f" (champion was {'v' + previous if previous else 'none'})"
                                + (f"\n\n{decision.line()}" if decision is not None else "")
                                + (f"\n\nreason given: {reason}" if reason else "")),
    }
    if decision is not None:
        tags[TAG_GATE_DECISION] = decision.model_dump_json()[:4900]
        tags[TAG_DECISION] = "refused" if refused else "passed"
        tags[TAG_REASONS] = "; ".join(decision.reasons)[:4900]
        tags["flywheel.outcome"] = decision.outcome[:4900]
    name = f"{event} v{version}" if version else event
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=name)
    run_id = run.info.run_id
    status = "FAILED"  # whatever goes wrong below, the run does not stay RUNNING
    try:
        if decision is not None:
            now = int(time.time() * 1000)
            metrics = [Metric(c.key, float(c.value), now, 0) for c in decision.criteria
                       if isinstance(c.value, (int, float)) and not isinstance(c.value, bool)
                       and math.isfinite(float(c.value))]
            params = [Param(f"criterion.{c.key}", f"{c.line()}: {'ok' if c.passed else 'FAILED'}"[:6000])
                      for c in decision.criteria]
            mlflow_client.log_batch(run_id, metrics=metrics, params=params)
        model_id = _model_id_if_registered(mlflow_client, domain, version) if version else None
        if model_id:  # a refusal may name a version that does not exist: nothing to link then
            mlflow_client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
        status = "FAILED" if refused else "FINISHED"
    finally:
        mlflow_client.set_terminated(run_id, status)
    return run_id


def _model_id_if_registered(mlflow_client, domain: str, version: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return model_id_of(mlflow_client.get_model_version(registered_model_name(domain), version))
    except MlflowException:
        return None


def governance_history(home, domain: str) -> list[dict[str, str]]:
    """Every governance decision of a domain (promote, rollback, import, and their refusals), oldest first."""
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
            "decision": r.data.tags.get(TAG_DECISION, ""),
            "reasons": r.data.tags.get(TAG_REASONS, ""),
            "reason": r.data.tags.get("flywheel.reason", ""),
            "actor": r.data.tags.get(TAG_ACTOR, ""),
            "status": r.info.status,
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
            raise IntegrityError(f"downloaded {name} v{model_version.version} ({location}) does not match its adapter "
                                 f"digest {expected[:16]}; the store's copy was changed after registration")
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
        "lineage": tags.get(TAG_LINEAGE, ""),
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
        "description": model_version.description or "",
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
