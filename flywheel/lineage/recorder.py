"""Lineage of one flywheel run: what the Dagster assets call around each stage, and how parent runs end.

One parent run per Dagster run and domain, one child run per stage (found again by its step key, so a
re-run reuses it), the stage's config as params, its numeric results as metrics, its artifacts as MLflow
dataset inputs/outputs with our content digests. The adapter is registered (`candidate`), evaluated,
and promoted to `champion` only when the gate passes; generation uses the champion.

Iterations and experiments. A run of the whole job is a numbered iteration (`flywheel.kind = iteration`,
`flywheel.iteration = N`); a run of part of it (one asset re-materialized, `flywheel train`) is an
experiment (`flywheel.kind = experiment`, no number). The number is taken when the run's first stage
starts (`IterationLineage.start`, under a per-domain lock), not before: a run that fails before any stage
takes none.

How parent runs end. A parent stays RUNNING while its Dagster run goes on; `close_dagster_run` ends it
when the Dagster run ends (the CLI after `execute_in_process`, the Dagster daemon's run-status sensors
otherwise): FINISHED, FAILED, or KILLED when cancelled or interrupted. Runs whose process died (SIGKILL,
power loss) are closed KILLED by `close_dead_runs` at the next start on the same host, from the
process identity every RUNNING run records (flywheel.lineage.runs.owner_tags). A KILLED iteration gives
its number back: it keeps it as `flywheel.released_iteration` (so does what it registered) and the next
iteration takes the number again.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flywheel
from flywheel.errors import NotFound
from flywheel.lineage import registry, runs, tracking
from flywheel.store import ArtifactStore, hash_tree, resolve_home

CODE_VERSION = f"flywheel-{flywheel.__version__}"
# Model version tag: the store dir the adapter was trained into, relative to the home (its name is the
# adapter's store key). Older versions hold an absolute path.
TAG_ADAPTER_PATH = "flywheel.adapter_path"
TAG_RELEASED = "flywheel.released_iteration"
PARENT_KINDS = ("iteration", "experiment")
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def next_iteration(home, domain: str) -> int:
    """1 + the highest iteration number held by the domain's iteration runs (1 for a new domain). Numbers a
    KILLED iteration gave back are taken again."""
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        return 1
    found = runs.find_runs(client, [experiment.experiment_id], {tracking.TAG_KIND: "iteration"})
    return 1 + max((int(r.data.tags[tracking.TAG_ITERATION]) for r in found
                    if r.data.tags.get(tracking.TAG_ITERATION, "").isdigit()), default=0)


# MLflow dataset kinds of the stages' artifacts.
DATASET_KIND = {"demonstrations": "demonstrations", "training_clips": "clips", "synthetic_videos": "synthetic_set",
                "refreshed_dataset": "dataset_version", "adapter_evaluation": "evaluation"}


def iteration_of_dagster_run(home, domain: str, dagster_run_id: str) -> int | None:
    """The iteration number whose parent run is tagged with this Dagster run id, or None."""
    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(domain))
    if experiment is None:
        return None
    found = runs.find_runs(client, [experiment.experiment_id],
                           {tracking.TAG_KIND: "iteration", tracking.TAG_DAGSTER_RUN_ID: dagster_run_id})
    numbers = [int(r.data.tags[tracking.TAG_ITERATION]) for r in found
               if r.data.tags.get(tracking.TAG_ITERATION, "").isdigit()]
    return numbers[-1] if numbers else None


def numeric(metadata: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metadata.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


StatusOf = Callable[[str], "str | None"]  # Dagster run id -> the MLflow status its end means, or None (not ended)


class IterationLineage:
    """The parent run of one run of a domain: a numbered iteration (`numbered=True`) or an experiment.

    Nothing is written until `start()` (called by the first `stage()`), so a run that never starts a stage
    leaves no run and takes no number. `owner_pid` is the process that keeps the parent running (the Dagster
    run worker; default: this process). `status_of` tells `close_dead_runs` how a dead process's Dagster run
    ended.
    """

    def __init__(self, home, domain: str, iteration: int | None = None, dagster_run_id: str | None = None, *,
                 numbered: bool = True, owner_pid: int | None = None, status_of: StatusOf | None = None,
                 label: str = ""):
        self.home = resolve_home(home)
        self.domain = tracking.check_domain(domain)
        self.dagster_run_id = dagster_run_id
        self.numbered = numbered
        self.owner_pid = owner_pid
        self.status_of = status_of
        self.label = label
        self._iteration = iteration if numbered else None
        self._run_id: str | None = None
        if not numbered and not dagster_run_id:
            raise ValueError("an experiment parent run is keyed by its Dagster run id: pass dagster_run_id")

    @classmethod
    def for_dagster_run(cls, home, domain: str, dagster_run_id: str, *, numbered: bool = True,
                        owner_pid: int | None = None, status_of: StatusOf | None = None,
                        label: str = "") -> IterationLineage:
        """The parent run of a Dagster run: every step of it (separate processes too) finds the same one."""
        return cls(home, domain, None, dagster_run_id, numbered=numbered, owner_pid=owner_pid,
                   status_of=status_of, label=label)

    def start(self) -> str:
        """Find or create the parent run (closing dead processes' runs first) and mark it RUNNING; its id.

        Under a per-domain lock, so two runs starting at once get two iterations, and the steps of one run
        (separate processes) all find the same one."""
        if self._run_id is not None:
            return self._run_id
        tracking.ensure_tracking_store(self.home)
        with tracking.file_lock(self.home, f"iterations-{self.domain}"):
            close_dead_runs(self.home, self.status_of)
            if not self.numbered:
                self._run_id = runs.start_experiment_run(self.home, self.domain, self.dagster_run_id, CODE_VERSION,
                                                         self.owner_pid, self.label)
                return self._run_id
            if self._iteration is None:
                found = iteration_of_dagster_run(self.home, self.domain, self.dagster_run_id) \
                    if self.dagster_run_id else None
                self._iteration = found if found is not None else next_iteration(self.home, self.domain)
            self._run_id = runs.start_iteration_run(self.home, self.domain, self._iteration, self.dagster_run_id,
                                                    CODE_VERSION, self.owner_pid)
        return self._run_id

    @property
    def run_id(self) -> str:
        return self.start()

    @property
    def iteration(self) -> int | None:
        """The iteration number (taken by `start`); None for an experiment."""
        self.start()
        return self._iteration

    @property
    def kind(self) -> str:
        return "iteration" if self.numbered else "experiment"

    @property
    def url(self) -> str:
        run = tracking.client(self.home).get_run(self.run_id)
        return tracking.run_url(self.home, run.info.experiment_id, self.run_id)

    @contextlib.contextmanager
    def stage(self, asset: str, step_key: str, config: Any | None = None):
        """A child run for one stage; `step_key` identifies the materialization (its artifact key)."""
        parent = self.start()
        scope = self._iteration if self.numbered else f"experiment/{self.dagster_run_id}"
        with runs.step_run(self.home, parent, asset, self.domain, self.dagster_run_id,
                           f"{self.domain}/{scope}/{asset}/{step_key}", CODE_VERSION) as run:
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
        path = Path(adapter_result.path).resolve()
        stored = str(path.relative_to(self.home)) if path.is_relative_to(self.home) else str(path)
        if client.get_model_version(name, version).tags.get(TAG_ADAPTER_PATH) != stored:
            client.set_model_version_tag(name, version, TAG_ADAPTER_PATH, stored)
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
        if stored and (self.home / stored / registry.ADAPTER_WEIGHTS).is_file():  # relative to the home, or absolute
            return self.home / stored
        _, source = registry.resolve_adapter(self.home, self.domain, version)
        digest = model_version.tags.get(registry.TAG_ADAPTER_DIGEST) or hash_tree(source)
        store = ArtifactStore(self.home)
        return store.get_or_create("adapters", f"registry-{digest[:24]}",
                                   lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True,
                                                               copy_function=registry.link_or_copy),
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
        """End the parent run (and any child still RUNNING, as KILLED); a KILLED iteration gives its number back."""
        if self._run_id is not None:
            client = tracking.client(self.home)
            _close_parent(client, client.get_run(self._run_id), status)

    def links(self) -> dict[str, str]:
        return {"mlflow_iteration_run": self.run_id, "mlflow_tracking_uri": tracking.tracking_uri(self.home)}


def close_dagster_run(home, dagster_run_id: str, status: str) -> list[str]:
    """End the parent runs of a Dagster run (one per domain it ran) with `status` (FINISHED, FAILED or KILLED),
    their children still RUNNING as KILLED; a KILLED iteration gives its number back. Idempotent. Returns the
    parent run ids."""
    if status not in TERMINAL:
        raise ValueError(f"status {status!r}: use one of {TERMINAL}")
    client = tracking.client(home)
    experiments = tracking.flywheel_experiment_ids(client)
    if not experiments:
        return []
    parents = [r for r in runs.find_runs(client, experiments, {tracking.TAG_DAGSTER_RUN_ID: dagster_run_id})
               if r.data.tags.get(tracking.TAG_KIND) in PARENT_KINDS]
    for parent in parents:
        _close_parent(client, parent, status)
    return [p.info.run_id for p in parents]


def close_dead_runs(home, status_of: StatusOf | None = None) -> list[str]:
    """Close the RUNNING runs of this host whose process is gone: steps as KILLED; parents as their Dagster
    run ended (`status_of`), else KILLED. Runs of other hosts are left to their own hosts and to the Dagster
    run-status sensors. Returns the closed run ids."""
    client = tracking.client(home)
    experiments = tracking.flywheel_experiment_ids(client)
    if not experiments:
        return []
    query = f"attributes.status = 'RUNNING' and tags.`{runs.TAG_HOST}` = '{socket.gethostname()}'"
    closed = []
    for run in client.search_runs(experiments, query, max_results=5000):
        if runs.owner_alive(run.data.tags) is not False:
            continue
        if run.data.tags.get(tracking.TAG_KIND) in PARENT_KINDS:
            dagster_run_id = run.data.tags.get(tracking.TAG_DAGSTER_RUN_ID)
            status = (status_of(dagster_run_id) if status_of and dagster_run_id else None) or "KILLED"
            _close_parent(client, run, status)
        else:
            client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed


def _close_parent(client, parent, status: str) -> None:
    experiment = parent.info.experiment_id
    children = runs.find_runs(client, [experiment], {tracking.TAG_PARENT_RUN: parent.info.run_id})
    for child in children:
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")
    if parent.info.status != status:
        client.set_terminated(parent.info.run_id, status)
    if status == "KILLED" and parent.data.tags.get(tracking.TAG_ITERATION):
        _release_iteration(client, parent, children)


def _release_iteration(client, parent, children) -> None:
    """Give a KILLED iteration's number back: the parent, its steps and the versions they registered keep it as
    flywheel.released_iteration; the parent's key no longer claims it."""
    tags = parent.data.tags
    number, domain = tags[tracking.TAG_ITERATION], tags.get(tracking.TAG_DOMAIN, "")
    for run in (parent, *children):
        if tracking.TAG_ITERATION in run.data.tags:
            client.set_tag(run.info.run_id, TAG_RELEASED, number)
            client.delete_tag(run.info.run_id, tracking.TAG_ITERATION)
        for version in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            client.set_model_version_tag(version.name, version.version, TAG_RELEASED, number)
            client.set_model_version_tag(version.name, version.version, registry.TAG_ITERATION, "")
            described = (version.description or "").replace(f"flywheel iteration {number},",
                                                            f"a killed run (iteration {number} given back),")
            if described != (version.description or ""):
                client.update_model_version(version.name, version.version, description=described)
    client.set_tag(parent.info.run_id, tracking.TAG_ITERATION_KEY, f"{domain}/released/{parent.info.run_id}")
    client.update_run(parent.info.run_id, name=f"{domain} iteration {number} (killed: number given back)")
