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
from typing import Any

import dagster as dg

from flywheel.decisions import Step
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import partition_of
from flywheel.lineage import registry, tracking
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


def model_version_links(home, domain: str, version: str) -> dict[str, dg.MetadataValue]:
    links = registry.links_for_version(home, domain, version)
    return {"mlflow_model_version": dg.MetadataValue.text(str(version)),
            "mlflow_registered_model": dg.MetadataValue.text(links["mlflow_registered_model"]),
            "mlflow_model_version_url": dg.MetadataValue.url(links["mlflow_model_version_url"])}


@contextlib.contextmanager
def step_lineage(context: dg.AssetExecutionContext, step: Step, params: dict[str, Any]) -> Iterator[dict]:
    """A child run of the iteration for this materialization (set as `step.run`); yields the links the asset
    reports. The iteration run ends with the step's status. A Dagster retry of the step finds the same child
    run again (same iteration, asset and params)."""
    lineage = step.lineage
    asset = context.asset_key.path[-1]
    step_key = hash_json({"asset": asset, "params": params})[:16]
    lineage.resume()
    try:
        with lineage.stage(asset, step_key, params) as run:
            run.set_tags({"dagster.step_key": context.op_execution_context.get_step_execution_context().step.key})
            step.run = run
            links = {
                "mlflow_run_url": dg.MetadataValue.url(run.url),
                "mlflow_run_id": dg.MetadataValue.text(run.run_id),
                "mlflow_iteration_run_id": dg.MetadataValue.text(lineage.run_id),
                "mlflow_iteration": dg.MetadataValue.int(lineage.iteration),
            }
            yield links
    except BaseException:
        lineage.finish("FAILED")
        raise
    lineage.finish()


def stage_params(config, section: str) -> dict[str, Any]:
    """MLflow params of a step: its config section, and the world model."""
    params = config.section_dump(section)
    params = params if isinstance(params, dict) else {section: params}
    return params | {"model": config.model.model_dump(mode="json", exclude={"device"})}
