"""MLflow lineage of asset materializations, in the step process (the core's IterationLineage does the work).

Every asset materialized in one Dagster run for one domain logs to one MLflow iteration run (found by the
Dagster run id tag, else the domain's next iteration); each materialization is a child run tagged with the
Dagster run id, asset, domain partition and code version, holding the stage config as params, the stage's
numbers as metrics and its upstream/produced artifacts as MLflow datasets with our content digests. A
single asset re-materialized later (an experiment) is a run of its own, so it gets its own iteration run.

The asset's metadata links back: `mlflow_run_url` (the MLflow UI), `mlflow_run_id`, `mlflow_iteration_run_id`,
and for adapters `mlflow_model_version` (+ `mlflow_model_version_url`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import partition_of
from flywheel.lineage import registry, runs, tracking
from flywheel.lineage.recorder import IterationLineage
from flywheel.store import hash_json


def use_tracking_store(flywheel: FlywheelResource) -> str:
    """Point this step process at the run's tracking store (the resource's URI if set) and create it once."""
    uri = flywheel.mlflow_tracking_uri
    if uri and os.environ.get(tracking.URI_ENV) != uri:
        # the step process's own setting; workload subprocesses inherit it through tracking_env()
        os.environ[tracking.URI_ENV] = uri
    return tracking.ensure_tracking_store(flywheel.home_path)


def iteration_lineage(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> IterationLineage:
    """The MLflow iteration of this Dagster run and domain (created by the run's first asset)."""
    use_tracking_store(flywheel)
    return IterationLineage.for_dagster_run(flywheel.home_path, partition_of(context), context.run.run_id)


@dataclass
class StepLineage:
    """The iteration and this materialization's child run, with what the asset reports about them."""

    lineage: IterationLineage
    run: runs.StepRun
    metadata: dict[str, dg.MetadataValue]

    def record(self, meta: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> Any:
        """Metrics and the produced artifact; `inputs` = upstream materializations (name -> raw metadata)."""
        result = stage_result(meta)
        datasets = [(name, str(m["key"]), str(m["path"])) for name, m in inputs.items()
                    if name != "adapter" and m.get("key") and m.get("path")]  # adapters go in as models
        self.lineage.record(self.run, result, datasets)
        return result

    def link_model_version(self, version: str) -> None:
        links = registry.links_for_version(self.lineage.home, self.lineage.domain, version)
        self.metadata["mlflow_model_version"] = dg.MetadataValue.text(str(version))
        self.metadata["mlflow_registered_model"] = dg.MetadataValue.text(links["mlflow_registered_model"])
        self.metadata["mlflow_model_version_url"] = dg.MetadataValue.url(links["mlflow_model_version_url"])


def stage_result(meta: dict[str, Any]):
    """A materialization's raw metadata as the core StageResult the recorder takes."""
    from flywheel.stages import StageResult

    return StageResult(stage=meta["stage"], key=str(meta["key"]), path=Path(meta["path"]), metadata=dict(meta),
                       reused=bool(meta.get("reused")))


@contextlib.contextmanager
def step_lineage(context: dg.AssetExecutionContext, flywheel: FlywheelResource, params: dict[str, Any],
                 lineage: IterationLineage | None = None) -> Iterator[StepLineage]:
    """A child run of the iteration for this materialization; the iteration run ends with the step's status.

    `params` is the stage config (logged as MLflow params). A Dagster retry of the step finds the same
    child run again (same iteration, asset and params).
    """
    lineage = lineage or iteration_lineage(context, flywheel)
    asset = context.asset_key.path[-1]
    step_key = hash_json({"asset": asset, "params": params})[:16]
    lineage.resume()
    try:
        with lineage.stage(asset, step_key, params) as run:
            run.set_tags({"dagster.step_key": context.op_execution_context.get_step_execution_context().step.key})
            metadata = {
                "mlflow_run_url": dg.MetadataValue.url(run.url),
                "mlflow_run_id": dg.MetadataValue.text(run.run_id),
                "mlflow_iteration_run_id": dg.MetadataValue.text(lineage.run_id),
                "mlflow_iteration": dg.MetadataValue.int(lineage.iteration),
            }
            yield StepLineage(lineage, run, metadata)
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.finish()
    context.log.info(f"MLflow: iteration {lineage.iteration} run {lineage.run_id}, step run {run.run_id} ({run.url})")


def stage_params(stage_config: Any, model: Any | None = None, **extra: Any) -> dict[str, Any]:
    """MLflow params of a step: the stage config, the world model (when it runs one) and asset-only options."""
    params = stage_config.model_dump(mode="json") if hasattr(stage_config, "model_dump") else dict(stage_config)
    if model is not None:
        params["model"] = model.model_dump(mode="json", exclude={"device"})
    return params | extra
