"""One job: a whole flywheel iteration for one domain (every asset whose stage is in this build); its\npartitioning (by domain) comes from the assets."""

import dagster as dg

from flywheel.iteration import STAGE_ORDER as STAGE_ASSETS  # one list of stages for the CLI and Dagster


STAGE_FUNCTIONS = {
    "demonstrations": "ingest_stage",
    "training_clips": "clips_stage",
    "adapter": "train_stage",
    "adapter_evaluation": "evaluate_stage",
    "synthetic_videos": "generate_stage",
    "pseudo_actions": "label_stage",
    "curated_trajectories": "curate_stage",
    "refreshed_dataset": "refresh_stage",
}


def iteration_assets() -> list[str]:
    """The assets a full iteration materializes: those whose core stage function exists in this build."""
    from flywheel import stages

    return [name for name in STAGE_ASSETS if hasattr(stages, STAGE_FUNCTIONS[name])]


flywheel_iteration = dg.define_asset_job(
    name="flywheel_iteration",
    selection=dg.AssetSelection.assets(*iteration_assets()),
    description="A whole flywheel iteration for one domain: ingest, clips, train, evaluate (gate), generate, "
                "label, curate (gate), refresh. Upstream results with unchanged inputs are reused.",
    tags={"flywheel/job": "iteration"},
)
