"""The jobs: a whole flywheel iteration for one domain (every stage of flywheel.pipeline; its partitioning by
domain comes from the assets; `flywheel iterate` launches it, a stage command its asset selection up to that
stage), and `flywheel_gc`, the home's lineage-aware garbage collection (`flywheel gc`)."""

import dagster as dg
from pydantic import Field

from flywheel.defs.resources import FlywheelResource
from flywheel.pipeline import STAGE_LIST

ITERATION_JOB = "flywheel_iteration"

flywheel_iteration = dg.define_asset_job(
    name=ITERATION_JOB,
    selection=dg.AssetSelection.assets(*(stage.asset for stage in STAGE_LIST)),
    description="A whole flywheel iteration for one domain: ingest, clips (model-fit check), train, evaluate "
                "(adapter gate), generate, label, curate (curation check), refresh (build-on decision). Upstream "
                "results with unchanged inputs are reused.",
    tags={"flywheel/job": "iteration"},
)


class GcSettings(dg.Config):
    dry_run: bool = Field(True, description="only list what would go, with sizes")
    keep_datasets: int = Field(3, ge=0, description="newest dataset versions kept per domain")
    min_age_hours: float = Field(1.0, ge=0, description="artifacts younger than this stay")


@dg.op(description="Delete what no champion or candidate adapter, recent dataset version or running iteration needs "
                   "(flywheel.retention); with dry_run, only list it with sizes.")
def collect_garbage(context: dg.OpExecutionContext, config: GcSettings, flywheel: FlywheelResource) -> None:
    from flywheel.retention import Policy, apply, plan

    policy = Policy(keep_datasets=config.keep_datasets, min_age_s=config.min_age_hours * 3600)
    if config.dry_run:
        for line in plan(flywheel.home_path, policy).lines():
            context.log.info(line)
        return
    removal = apply(flywheel.home_path, policy)
    for name, why in removal.skipped.items():
        context.log.info(f"kept {name}: {why}")
    context.log.info(f"freed {removal.freed_bytes / 1e6:.1f} MB in {len(removal.removed)} item(s)")


@dg.job(description="`flywheel gc` from the UI: lineage-aware retention of the flywheel home (dry run by default).")
def flywheel_gc():
    collect_garbage()
