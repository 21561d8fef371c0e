"""MLflow lineage of asset materializations, in the step process (the core's IterationLineage does the work).

Every asset materialized in one Dagster run for one domain logs to one MLflow parent run (found by the
Dagster run id tag); each materialization is a child run tagged with the Dagster run id, asset, domain
partition and code version, holding the stage config as params, the stage's numbers as metrics and its
upstream/produced artifacts as MLflow datasets with our content digests.

A run of the whole job (`flywheel iterate`, the schedule, the inbox sensor, "Materialize all") is a numbered
iteration; a run of part of it (one asset re-materialized, a stage command such as `flywheel train`) is an
experiment: a parent run without an iteration number. The parent is opened when the first stage starts and
stays RUNNING until the Dagster run ends (flywheel.defs.run_status closes it), so it never reads FINISHED
while steps are still to come.

The asset's metadata links back: `mlflow_run_url` (the MLflow UI, flywheel.lineage.tracking.ui_base_url),
`mlflow_run_id`, `mlflow_iteration_run_id`, `mlflow_iteration` (numbered iterations), and for adapters
`mlflow_model_version` (+ `mlflow_model_version_url`).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import dagster as dg

from flywheel.decisions import Step
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import partition_of
from flywheel.lineage import registry, tracking
from flywheel.lineage.recorder import IterationLineage
from flywheel.pipeline import STAGE_LIST
from flywheel.store import hash_json

# Dagster run tag of a run that ended because its process was interrupted (Ctrl-C, SIGTERM), not by a failure.
FAILURE_REASON_TAG = "dagster/failure_reason"
INTERRUPTED = "UNEXPECTED_TERMINATION"


def use_tracking_store(flywheel: FlywheelResource) -> str:
    """Point this step process at the run's tracking store (the resource's URI if set) and create it once."""
    uri = flywheel.tracking_uri
    if uri and os.environ.get(tracking.URI_ENV) != uri:
        # the step process's own setting; workload subprocesses inherit it through tracking_env()
        os.environ[tracking.URI_ENV] = uri
    return tracking.ensure_tracking_store(flywheel.home_path)


def is_whole_iteration(selection) -> bool:
    """Whether a Dagster run's asset selection (None: the job's own, i.e. all of flywheel_iteration) covers every
    stage: only such a run is a numbered iteration."""
    if selection is None:
        return True
    selected = {key.path[-1] for key in selection}
    return all(stage.asset in selected for stage in STAGE_LIST)


def mlflow_status(run: dg.DagsterRun | None) -> str | None:
    """The MLflow status a Dagster run's end means (None while it has not ended): SUCCESS -> FINISHED,
    CANCELED -> KILLED, FAILURE -> FAILED, or KILLED when the run was interrupted rather than failed."""
    if run is None:
        return None
    if run.status == dg.DagsterRunStatus.SUCCESS:
        return "FINISHED"
    if run.status in (dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.CANCELING):
        return "KILLED"
    if run.status == dg.DagsterRunStatus.FAILURE:
        return "KILLED" if run.tags.get(FAILURE_REASON_TAG) == INTERRUPTED else "FAILED"
    return None


def run_worker_pid() -> int:
    """The process that runs the whole Dagster run: this one when steps run in-process (the CLI, the
    in_process executor), the parent when the multiprocess executor spawned this step process."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getpid()


def iteration_lineage(context: dg.AssetExecutionContext, flywheel: FlywheelResource) -> IterationLineage:
    """The MLflow parent run of this Dagster run and domain: opened by the run's first stage, not here."""
    use_tracking_store(flywheel)
    instance = context.instance
    # a run of a whole job (launched without a selection; or an ad-hoc job such as dg.materialize's, whose run
    # records an empty one) covers what its job materializes
    selection = context.run.asset_selection or context.job_def.asset_layer.selected_asset_keys
    label = ", ".join(sorted(key.path[-1] for key in selection)) if selection else ""
    return IterationLineage.for_dagster_run(
        flywheel.home_path, partition_of(context), context.run.run_id, numbered=is_whole_iteration(selection),
        owner_pid=run_worker_pid(), status_of=lambda run_id: mlflow_status(instance.get_run_by_id(run_id)),
        label=label)


def model_version_links(home, domain: str, version: str) -> dict[str, dg.MetadataValue]:
    links = registry.links_for_version(home, domain, version)
    return {"mlflow_model_version": dg.MetadataValue.text(str(version)),
            "mlflow_registered_model": dg.MetadataValue.text(links["mlflow_registered_model"]),
            "mlflow_model_version_url": dg.MetadataValue.url(links["mlflow_model_version_url"])}


@contextlib.contextmanager
def step_lineage(context: dg.AssetExecutionContext, step: Step, params: dict[str, Any]) -> Iterator[dict]:
    """A child run of the parent run for this materialization (set as `step.run`); yields the links the asset
    reports. The child ends with the step (FINISHED, FAILED, or KILLED when interrupted); the parent ends with
    the Dagster run. A Dagster retry of the step finds the same child run again (same parent, asset, params)."""
    lineage = step.lineage
    asset = context.asset_key.path[-1]
    step_key = hash_json({"asset": asset, "params": params})[:16]
    with lineage.stage(asset, step_key, params) as run:
        run.set_tags({"dagster.step_key": context.op_execution_context.get_step_execution_context().step.key})
        step.run = run
        links = {
            "mlflow_run_url": dg.MetadataValue.url(run.url),
            "mlflow_run_id": dg.MetadataValue.text(run.run_id),
            "mlflow_iteration_run_id": dg.MetadataValue.text(lineage.run_id),
        }
        if lineage.iteration is not None:
            links["mlflow_iteration"] = dg.MetadataValue.int(lineage.iteration)
        yield links


def stage_params(config, section: str) -> dict[str, Any]:
    """MLflow params of a step: its config section, and the world model."""
    params = config.section_dump(section)
    params = params if isinstance(params, dict) else {section: params}
    return params | {"model": config.model.model_dump(mode="json", exclude={"device"})}
