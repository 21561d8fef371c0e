"""refreshed_dataset: a new LeRobot dataset version, the demonstrations plus the accepted synthetic episodes.

Its MLflow run records which synthetic set each synthetic episode came from, so `flywheel adapters lineage`
can answer which adapter version, base model, prompt and seed produced it.
"""

import json
from pathlib import Path

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import stage_settings
from flywheel.defs.domains import record_refreshed_version
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.defs.stages import run_stage
from flywheel.iteration import why_not_build_on

RefreshSettings = stage_settings("refresh", "RefreshSettings")


@dg.asset(
    name="refreshed_dataset",
    group_name="refresh",
    partitions_def=domain_partitions,
    deps=["curated_trajectories", "demonstrations"],
    check_specs=[checks.spec("refreshed_dataset", checks.REFRESH_CHECK,
                             "the new dataset version loads with lerobot's LeRobotDataset and its counts match")],
    kinds={"lerobot"},
    description="The domain's next LeRobot dataset version (v3.0): real demonstrations + accepted synthetic episodes. "
                "The domain's next iteration ingests it (see demonstrations' follow_refreshed).",
)
def refreshed_dataset(context: dg.AssetExecutionContext, config: RefreshSettings, flywheel: FlywheelResource):
    refresh_config = config.to_core("refresh")
    curated = upstream(context, "curated_trajectories")
    demos = upstream(context, "demonstrations")
    with step_lineage(context, flywheel, stage_params(refresh_config)) as lineage:
        meta = run_stage(context, "refresh_stage", flywheel.home_path, curated["path"], demos["path"], refresh_config)
        result = lineage.record(meta, inputs={"curated_trajectories": curated, "demonstrations": demos})
        lineage.lineage.record_refreshed(lineage.run, result, synthetic_set_of(curated["path"]))
    check = checks.refresh_check(meta)
    # The domain's next iteration ingests this version (demonstrations' follow_refreshed), unless it does
    # not load or its synthetic episodes failed the usefulness gate.
    refused = why_not_build_on(meta) or (None if check.passed else "it does not pass the loads_with_lerobot check")
    if refused:
        context.log.warning(f"domain {context.partition_key!r}: the next iteration keeps its current "
                            f"demonstrations, not {meta['path']}: {refused}")
        meta["next_iteration_ingests_it"] = False
    else:
        record_refreshed_version(flywheel.home_path, context.partition_key, meta["path"])
        context.log.info(f"domain {context.partition_key!r}: the next iteration ingests {meta['path']}")
        meta["next_iteration_ingests_it"] = True
    return materialize(meta, inputs=input_keys(curated_trajectories=curated, demonstrations=demos),
                       check_results=[check], links=lineage.metadata)


def synthetic_set_of(curated_path: str) -> str:
    """The key (content digest) of the synthetic set a curation filtered: its store folder's name."""
    links = Path(curated_path) / "curated.json"
    try:
        return Path(json.loads(links.read_text())["synthetic"]).name
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{links}: cannot tell which synthetic set was curated ({type(e).__name__}: {e}); "
                         "materialize curated_trajectories again") from None
