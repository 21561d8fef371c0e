"""Lineage both ways, read back from the tracking store.

Backward, for a synthetic episode of a refreshed dataset version:
    refresh run  (tag flywheel.produces.dataset_version = <dataset digest>, artifact lineage/dataset_version-*.json
                  maps episode_index -> synthetic set digest + episode id)
    generation run (tag flywheel.produces.synthetic_set = <set digest>, tags flywheel.adapter_version,
                  artifact lineage/synthetic_set-*.json with each episode's prompt and seed)
    model version  (flywheel-<domain> v<N>: base model + revision, training data digest, parent version)

Forward, for an adapter version: generation runs tagged with it -> the synthetic sets they produced ->
refresh runs whose flywheel.synthetic_sets tag lists those sets -> the dataset versions they produced.
"""

from __future__ import annotations

from typing import Any

from flywheel.lineage import tracking
from flywheel.lineage.registry import (
    TAG_ADAPTER_DIGEST,
    TAG_BASE_MODEL,
    TAG_BASE_REVISION,
    TAG_PARENT_VERSION,
    TAG_TRAINING_DATA,
    TAG_TRAINING_RUN,
    model_id_of,
)
from flywheel.lineage.runs import (
    ADAPTER_MODEL_TAG,
    ADAPTER_VERSION_TAG,
    PRODUCES_TAG,
    SYNTHETIC_SETS_TAG,
    dataset_version_artifact,
    find_runs,
    load_run_json,
    synthetic_set_artifact,
)
from flywheel.lineage.tracking import registered_model_name


def lineage_of_synthetic_episode(
    home,
    domain: str,
    *,
    dataset_digest: str | None = None,
    episode_index: int | None = None,
    synthetic_set_digest: str | None = None,
    episode_id: str | None = None,
) -> dict[str, Any]:
    """Which adapter version, base model, training data, prompt and seed produced one synthetic episode.

    Name the episode either by its place in a refreshed dataset (`dataset_digest`, `episode_index`)
    or in its synthetic set (`synthetic_set_digest`, `episode_id`).
    """
    mlflow_client = tracking.client(home)
    experiments = _domain_experiments(mlflow_client, domain)
    result: dict[str, Any] = {"domain": domain}
    if dataset_digest is not None:
        if episode_index is None:
            raise ValueError("dataset_digest given without episode_index: name the episode's index in that dataset")
        refresh = _producer(mlflow_client, experiments, "dataset_version", dataset_digest)
        members = load_run_json(home, refresh.info.run_id, dataset_version_artifact(dataset_digest))["members"]
        member = next((m for m in members if int(m["episode_index"]) == int(episode_index)), None)
        if member is None:
            raise LookupError(
                f"episode {episode_index} of dataset version {dataset_digest[:16]} is not a synthetic episode "
                f"(its synthetic episodes are {sorted(int(m['episode_index']) for m in members)[:20]}...)"
            )
        synthetic_set_digest, episode_id = member["synthetic_set_digest"], member["episode_id"]
        result |= {"dataset_digest": dataset_digest, "episode_index": int(episode_index), "refresh_run_id": refresh.info.run_id}
    if synthetic_set_digest is None or episode_id is None:
        raise ValueError("name the episode by (dataset_digest, episode_index) or (synthetic_set_digest, episode_id)")
    generation = _producer(mlflow_client, experiments, "synthetic_set", synthetic_set_digest)
    record = load_run_json(home, generation.info.run_id, synthetic_set_artifact(synthetic_set_digest))
    episode = next((e for e in record["episodes"] if str(e["episode_id"]) == str(episode_id)), None)
    if episode is None:
        raise LookupError(f"synthetic set {synthetic_set_digest[:16]} has no episode {episode_id!r}")
    result |= {
        "synthetic_set_digest": synthetic_set_digest,
        "episode_id": episode_id,
        "prompt": episode["prompt"],
        "seed": episode["seed"],
        "episode": episode,
        "generation_run_id": generation.info.run_id,
        "generation_run_url": tracking.run_url(home, generation.info.experiment_id, generation.info.run_id),
        "adapter": None,
        "base_model_id": generation.data.tags.get("flywheel.base_model_id"),
    }
    version = generation.data.tags.get(ADAPTER_VERSION_TAG)
    if version:
        result["adapter"] = adapter_provenance(home, domain, version)
        result["base_model_id"] = result["adapter"]["base_model_id"]
    return result


def adapter_provenance(home, domain: str, version: str | int) -> dict[str, Any]:
    """What an adapter version was made from: base model, training data, parent, run, iteration."""
    mlflow_client = tracking.client(home)
    model_version = mlflow_client.get_model_version(registered_model_name(domain), str(version))
    tags = model_version.tags
    return {
        "registered_model": model_version.name,
        "version": str(model_version.version),
        "model_id": model_id_of(model_version),
        "adapter_digest": tags.get(TAG_ADAPTER_DIGEST, ""),
        "base_model_id": tags.get(TAG_BASE_MODEL, ""),
        "base_revision": tags.get(TAG_BASE_REVISION, ""),
        "training_dataset_digest": tags.get(TAG_TRAINING_DATA, ""),
        "parent_version": tags.get(TAG_PARENT_VERSION) or None,
        "training_run_id": tags.get(TAG_TRAINING_RUN) or model_version.run_id,
        "iteration": tags.get("flywheel.iteration", ""),
        "method": tags.get("flywheel.method", ""),
        "url": tracking.model_version_url(home, domain, str(model_version.version)),
    }


def ancestry_of_adapter(home, domain: str, version: str | int) -> list[dict[str, Any]]:
    """The adapter and the adapters it continued from, newest first."""
    chain, seen = [], set()
    current: str | None = str(version)
    while current and current not in seen:
        seen.add(current)
        provenance = adapter_provenance(home, domain, current)
        chain.append(provenance)
        current = provenance["parent_version"]
    return chain


def products_of_adapter(home, domain: str, version: str | int) -> dict[str, list[dict[str, Any]]]:
    """The synthetic sets an adapter version generated and the dataset versions that folded them in."""
    mlflow_client = tracking.client(home)
    experiments = _domain_experiments(mlflow_client, domain)
    name = registered_model_name(domain)
    generations = find_runs(mlflow_client, experiments, {ADAPTER_MODEL_TAG: name, ADAPTER_VERSION_TAG: str(version)})
    synthetic_sets = [
        {
            "digest": run.data.tags[PRODUCES_TAG + "synthetic_set"],
            "run_id": run.info.run_id,
            "asset": run.data.tags.get(tracking.TAG_ASSET, ""),
            "iteration": run.data.tags.get(tracking.TAG_ITERATION, ""),
        }
        for run in generations
        if PRODUCES_TAG + "synthetic_set" in run.data.tags
    ]
    dataset_versions: dict[str, dict[str, Any]] = {}
    for synthetic_set in synthetic_sets:
        query = f"tags.`{SYNTHETIC_SETS_TAG}` LIKE '%{synthetic_set['digest']}%'"
        for run in mlflow_client.search_runs(experiments, query, max_results=1000):
            digest = run.data.tags.get(PRODUCES_TAG + "dataset_version")
            if digest:
                entry = dataset_versions.setdefault(digest, {"digest": digest, "run_id": run.info.run_id, "synthetic_sets": []})
                entry["synthetic_sets"].append(synthetic_set["digest"])
    return {"synthetic_sets": synthetic_sets, "dataset_versions": list(dataset_versions.values())}


def _producer(mlflow_client, experiments: list[str], kind: str, digest: str):
    runs = find_runs(mlflow_client, experiments, {PRODUCES_TAG + kind: digest})
    if not runs:
        raise LookupError(f"no run in this store produced {kind} {digest[:16]}; was its step logged to MLflow?")
    return runs[-1]  # the first producer; re-runs reuse the same run anyway


def _domain_experiments(mlflow_client, domain: str) -> list[str]:
    experiment = mlflow_client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        raise LookupError(f"no MLflow experiment {tracking.experiment_name(domain)!r}: nothing logged for domain {domain!r}")
    return [experiment.experiment_id]
