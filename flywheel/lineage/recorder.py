"""Lineage of one flywheel iteration: what the CLI runner and the Dagster assets call after each stage.

One parent run per iteration, one child run per stage (found again by its step key, so a re-run
reuses it), the stage's config as params, its numeric results as metrics, its artifacts as MLflow
dataset inputs/outputs with our content digests. The adapter is registered (`candidate`), evaluated,
and promoted to `champion` only when the gate passes; generation uses the champion.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import flywheel
from flywheel.lineage import registry, runs, tracking
from flywheel.store import resolve_home

CODE_VERSION = f"flywheel-{flywheel.__version__}"


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

    def register_adapter(self, run: runs.StepRun, adapter_result, training_digest: str) -> str:
        losses = adapter_result.path / "loss.csv"
        if losses.is_file():
            import pandas as pd

            table = pd.read_csv(losses)
            run.log_step_metrics({"step": int(r.step), "loss": float(r.loss), "lr": float(r.lr)}
                                 for r in table.itertuples())
        parent = registry.champion_version(self.home, self.domain)
        return registry.register_adapter(self.home, self.domain, adapter_result.path, None, training_digest,
                                         self.iteration, parent_version=parent, run_id=run.run_id,
                                         code_version=CODE_VERSION)

    def gate_and_promote(self, version: str, metrics: dict, evaluate_config) -> registry.GateDecision:
        """Record base vs adapter evaluation on the version; promote to champion if the gate passes."""
        registry.record_evaluation(self.home, self.domain, version,
                                   {"psnr": metrics["psnr_adapter"], "ssim": metrics["ssim_adapter"]},
                                   {"psnr": metrics["psnr_base"], "ssim": metrics["ssim_base"]})
        margins = {"metrics": [{"name": "psnr", "min_gain_over_base": evaluate_config.min_psnr_gain_db,
                                "max_drop_vs_champion": evaluate_config.max_psnr_drop_vs_champion_db}]}
        decision = registry.gate_for_version(self.home, self.domain, version, margins)
        if decision.passed:
            registry.promote(self.home, self.domain, version, decision, reason=f"iteration {self.iteration} gate")
        return decision

    def champion(self) -> tuple[str, Path] | None:
        """(version, adapter dir) of the domain's champion, or None when no adapter was ever promoted."""
        if registry.champion_version(self.home, self.domain) is None:
            return None
        return registry.resolve_adapter(self.home, self.domain)

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


def summary_json(decision: registry.GateDecision) -> str:
    return json.dumps(decision.model_dump(), default=str)
