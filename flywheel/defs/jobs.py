"""One job: a whole flywheel iteration for one domain (every stage of flywheel.pipeline); its partitioning (by
domain) comes from the assets. `flywheel iterate` launches it; a stage command launches it with the asset
selection up to that stage."""

import dagster as dg

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
