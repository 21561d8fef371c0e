"""One job: a whole flywheel iteration for one domain (every asset whose stage is in this build); its\npartitioning (by domain) comes from the assets."""

import dagster as dg

STAGE_ASSETS = [
    "demonstrations",
    "training_clips",
    "adapter",
    "adapter_evaluation",
    "synthetic_videos",
    "pseudo_actions",
    "curated_trajectories",
    "refreshed_dataset",
]


def iteration_assets() -> list[str]:
    """The assets a full iteration materializes: those whose core stage function exists in this build."""
    try:
        from flywheel.iteration import available_stages
    except ImportError:
        return list(STAGE_ASSETS)
    return [name for name in STAGE_ASSETS if name in set(available_stages())]


flywheel_iteration = dg.define_asset_job(
    name="flywheel_iteration",
    selection=dg.AssetSelection.assets(*iteration_assets()),
    description="A whole flywheel iteration for one domain: ingest, clips, train, evaluate (gate), generate, "
                "label, curate (gate), refresh. Upstream results with unchanged inputs are reused.",
    tags={"flywheel/job": "iteration"},
)
