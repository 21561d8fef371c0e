"""Lineage of one flywheel iteration: what the CLI runner and the Dagster assets call after each stage.

One parent run per iteration, one child run per stage (found again by its step key, so a re-run
reuses it), the stage's config as params, its numeric results as metrics, its artifacts as MLflow
dataset inputs/outputs with our content digests. The adapter is registered (`candidate`), evaluated,
and promoted to `champion` only when the gate passes; generation uses the champion.

The Dagster assets use the same calls; `IterationLineage.for_dagster_run` finds the iteration whose
parent run carries the Dagster run id (every asset of one Dagster run shares it) or starts the
domain's next one.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import flywheel
from flywheel.errors import NotFound
from flywheel.lineage import registry, runs, tracking
from flywheel.store import ArtifactStore, hash_tree, resolve_home

CODE_VERSION = f"flywheel-{flywheel.__version__}"
# Model version tag: the store dir the adapter was trained into (its name is the adapter's store key).
TAG_ADAPTER_PATH = "flywheel.adapter_path"


def next_iteration(home, domain: str) -> int:
    """1 + the highest iteration logged for the domain (1 for a new domain)."""
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        return 1
    found = runs.find_runs(client, [experiment.experiment_id], {tracking.TAG_KIND: "iteration"})
    return 1 + max((int(r.data.tags.get(tracking.TAG_ITERATION, 0)) for r in found), default=0)


# MLflow dataset kinds of the stages' artifacts.
DATASET_KIND = {"demonstrations": "demonstrations", "training_clips": "clips", "synthetic_videos": "synthetic_set",
                "refreshed_dataset": "dataset_version", "adapter_evaluation": "evaluation"}


def iteration_of_dagster_run(home, domain: str, dagster_run_id: str) -> int | None:
    """The iteration whose parent run is tagged with this Dagster run id, or None."""
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        return None
    found = runs.find_runs(client, [experiment.experiment_id],
                           {tracking.TAG_KIND: "iteration", tracking.TAG_DAGSTER_RUN_ID: dagster_run_id})
    return int(found[-1].data.tags[tracking.TAG_ITERATION]) if found else None


def numeric(metadata: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metadata.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class IterationLineage:
    def __init__(self, home, domain: str, iteration: int | None = None, dagster_run_id: str | None = None):
        self.home = resolve_home(home)
        self.domain = domain
        tracking.ensure_tracking_store(self.home)
        self.iteration = iteration if iteration is not None else next_iteration(self.home, domain)
        self.dagster_run_id = dagster_run_id
        self.run_id = runs.start_iteration_run(self.home, domain, self.iteration, dagster_run_id, CODE_VERSION)

    @classmethod
    def for_dagster_run(cls, home, domain: str, dagster_run_id: str) -> IterationLineage:
        """The iteration of a Dagster run: found by its run id tag, else the domain's next iteration.

        Under a per-domain lock, so two Dagster runs starting at once get two iterations, and the
        steps of one run (separate processes) all find the same one.
        """
        home = resolve_home(home)
        tracking.ensure_tracking_store(home)
        with tracking.file_lock(home, f"iterations-{domain}"):
            return cls(home, domain, iteration_of_dagster_run(home, domain, dagster_run_id), dagster_run_id)

    @property
    def url(self) -> str:
        run = tracking.client(self.home).get_run(self.run_id)
        return tracking.run_url(self.home, run.info.experiment_id, self.run_id)

    def resume(self) -> None:
        """Mark the iteration run RUNNING again (a Dagster run's next step; each step ends it)."""
        tracking.client(self.home).update_run(self.run_id, status="RUNNING")

    @contextlib.contextmanager
    def stage(self, asset: str, step_key: str, config: Any | None = None):
        """A child run for one stage; `step_key` identifies the materialization (its artifact key)."""
        with runs.step_run(self.home, self.run_id, asset, self.domain, self.dagster_run_id,
                           f"{self.domain}/{self.iteration}/{asset}/{step_key}", CODE_VERSION) as run:
            if config is not None:
                run.log_params(config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config))
            yield run

    def record(self, run: runs.StepRun, result, inputs: list[tuple[str, str, str]] = ()) -> None:
        """Metrics from the stage's metadata; the artifact as a dataset output; `inputs` = (name, digest, source)."""
        run.log_metrics(numeric(result.metadata))
        for name, digest, source in inputs:
            run.log_dataset_input(name, digest, source, DATASET_KIND.get(name, "other"))
        if result.stage not in ("synthetic_videos", "refreshed_dataset"):  # those two log richer lineage records
            run.log_dataset_output(result.stage, result.key, str(result.path), DATASET_KIND.get(result.stage, "other"))

    def register_adapter(self, run: runs.StepRun, adapter_result, training_digest: str,
                         parent_version: str | None = None) -> str:
        """The adapter as a version of the domain's line (flywheel.decisions.register_candidate decides when)."""
        losses = adapter_result.path / "loss.csv"
        if losses.is_file():
            import pandas as pd

            table = pd.read_csv(losses)
            run.log_step_metrics({"step": int(r.step), "loss": float(r.loss), "lr": float(r.lr)}
                                 for r in table.itertuples())
        version = registry.register_adapter(self.home, self.domain, adapter_result.path, None, training_digest,
                                            self.iteration, parent_version=parent_version, run_id=run.run_id,
                                            code_version=CODE_VERSION)
        client = tracking.client(self.home)
        name = tracking.registered_model_name(self.domain)
        if client.get_model_version(name, version).tags.get(TAG_ADAPTER_PATH) != str(adapter_result.path):
            client.set_model_version_tag(name, version, TAG_ADAPTER_PATH, str(adapter_result.path))
        return version

    def champion(self) -> tuple[str, Path] | None:
        """(version, adapter dir) of the domain's champion, or None when no adapter was ever promoted."""
        version = registry.champion_version(self.home, self.domain)
        if version is None:
            return None
        return version, self.adapter_dir(version)

    def adapter_dir(self, version: str | int) -> Path:
        """A local dir of a registered adapter version whose folder name identifies its content.

        Generation keys its artifact by the adapter dir's name, so the registry's copy (always named
        `artifacts`) would make different adapters collide: prefer the store dir the version was
        trained into; when it is gone, copy the registry's files into the store under the version's digest.
        """
        client = tracking.client(self.home)
        name = tracking.registered_model_name(self.domain)
        try:
            model_version = client.get_model_version(name, str(version))
        except Exception as err:
            raise NotFound(f"{name} has no version {version!r} ({err}); list them with `flywheel adapters list`") from None
        stored = model_version.tags.get(TAG_ADAPTER_PATH)
        if stored and (Path(stored) / registry.ADAPTER_WEIGHTS).is_file():
            return Path(stored)
        _, source = registry.resolve_adapter(self.home, self.domain, version)
        digest = model_version.tags.get(registry.TAG_ADAPTER_DIGEST) or hash_tree(source)
        store = ArtifactStore(self.home)
        return store.get_or_create("adapters", f"registry-{digest[:24]}",
                                   lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True),
                                   {"registered_model": name, "version": str(version), "adapter_digest": digest})

    def version_of_adapter_dir(self, adapter_dir: str | Path) -> str | None:
        """The registered version with this adapter dir's content, or None (never registered)."""
        client = tracking.client(self.home)
        name = tracking.registered_model_name(self.domain)
        digest = hash_tree(Path(adapter_dir))
        found = client.search_model_versions(f"name = '{name}' and tags.`{registry.TAG_ADAPTER_DIGEST}` = '{digest}'")
        return str(min(int(v.version) for v in found)) if found else None

    def record_synthetic(self, run: runs.StepRun, result, adapter_version: str | None, base_model_id: str) -> None:
        import pandas as pd

        samples = pd.read_parquet(result.path / "samples.parquet")
        episodes = [{"episode_id": r.request_id, "prompt": r.prompt, "seed": int(r.seed),
                     "source_episode_id": r.source_episode_id, "source_clip_id": r.source_clip_id}
                    for r in samples.itertuples()]
        runs.log_synthetic_set(run, self.domain, adapter_version, result.key, str(result.path), episodes,
                               base_model_id=base_model_id)

    def record_refreshed(self, run: runs.StepRun, result, synthetic_digest: str) -> None:
        from flywheel.refresh.provenance import read_provenance

        table = read_provenance(result.path)
        members = []
        if table is not None:
            for r in table[table["is_synthetic"]].itertuples():
                members.append({"episode_index": int(r.episode_index), "synthetic_set_digest": synthetic_digest,
                                "episode_id": str(getattr(r, "clip_id", r.episode_index))})
        runs.log_refreshed_dataset(run, result.key, str(result.path), members,
                                   profile={"real_episodes": result.metadata.get("real_episodes", 0)})

    def finish(self, status: str = "FINISHED") -> None:
        runs.finish_iteration_run(self.home, self.run_id, status)

    def links(self) -> dict[str, str]:
        return {"mlflow_iteration_run": self.run_id, "mlflow_tracking_uri": tracking.tracking_uri(self.home)}
