"""refreshed_dataset: a new LeRobot dataset version, the demonstrations plus the accepted synthetic episodes."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import stage_settings
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.defs.stages import run_stage

RefreshSettings = stage_settings("refresh", "RefreshSettings")


@dg.asset(
    name="refreshed_dataset",
    group_name="refresh",
    partitions_def=domain_partitions,
    deps=["curated_trajectories", "demonstrations"],
    check_specs=[checks.spec("refreshed_dataset", checks.REFRESH_CHECK,
                             "the new dataset version loads with lerobot's LeRobotDataset and its counts match")],
    kinds={"lerobot"},
    description="The domain's next LeRobot dataset version (v3.0): real demonstrations + accepted synthetic episodes.",
)
def refreshed_dataset(context: dg.AssetExecutionContext, config: RefreshSettings, flywheel: FlywheelResource):
    refresh_config = config.to_core("refresh")
    curated = upstream(context, "curated_trajectories")
    demos = upstream(context, "demonstrations")
    meta = run_stage(context, "refresh_stage", flywheel.home_path, curated["path"], demos["path"], refresh_config)
    return materialize(meta, inputs=input_keys(curated_trajectories=curated, demonstrations=demos),
                       check_results=[checks.refresh_check(meta)])
