"""curated_trajectories: the quality filter stack keeps the synthetic trajectories worth training on."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import stage_settings
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.defs.stages import run_stage

QualitySettings = stage_settings(
    "quality", "QualitySettings",
    launchpad_only={
        "min_pass_rate": (float, 0.05, "gate: below this share of kept trajectories the refresh is blocked "
                                       "(the generator or the filters are off)"),
        "max_pass_rate": (float, 1.0, "gate: above this share the filters are not filtering"),
    },
)


@dg.asset(
    name="curated_trajectories",
    group_name="curate",
    partitions_def=domain_partitions,
    deps=["pseudo_actions", "demonstrations"],
    check_specs=[checks.spec("curated_trajectories", checks.CURATION_CHECK,
                             "the share of trajectories the filters keep is within [min_pass_rate, max_pass_rate]")],
    kinds={"parquet"},
    description="The labelled synthetic trajectories that pass every quality filter, with per-filter scores.",
)
def curated_trajectories(context: dg.AssetExecutionContext, config: QualitySettings, flywheel: FlywheelResource):
    if not 0.0 <= config.min_pass_rate <= config.max_pass_rate <= 1.0:
        raise ValueError(f"pass-rate gate: need 0 <= min_pass_rate <= max_pass_rate <= 1, got "
                         f"[{config.min_pass_rate}, {config.max_pass_rate}]")
    quality_config = config.to_core("quality")
    labels = upstream(context, "pseudo_actions")
    demos = upstream(context, "demonstrations")
    params = stage_params(quality_config, gate={"min_pass_rate": config.min_pass_rate,
                                                "max_pass_rate": config.max_pass_rate})
    with step_lineage(context, flywheel, params) as lineage:
        meta = run_stage(context, "curate_stage", flywheel.home_path, labels["path"], demos["path"], quality_config,
                         model=flywheel.model_config_core())
        lineage.record(meta, inputs={"pseudo_actions": labels, "demonstrations": demos})
    check = checks.curation_check(meta, config.min_pass_rate, config.max_pass_rate)
    return materialize(meta, inputs=input_keys(pseudo_actions=labels, demonstrations=demos), check_results=[check],
                       links=lineage.metadata)
