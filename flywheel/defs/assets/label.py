"""pseudo_actions: actions for the synthetic videos, labelled by an inverse-dynamics model."""

import dagster as dg

from flywheel.defs.config import stage_settings
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.defs.stages import run_stage

LabelSettings = stage_settings("label", "LabelSettings")


@dg.asset(
    name="pseudo_actions",
    group_name="label",
    partitions_def=domain_partitions,
    deps=["synthetic_videos", "demonstrations"],
    kinds={"pytorch", "parquet"},
    description="Per-frame actions for every synthetic video, from an inverse-dynamics model trained on the "
                "domain's demonstrations.",
)
def pseudo_actions(context: dg.AssetExecutionContext, config: LabelSettings, flywheel: FlywheelResource):
    label_config = config.to_core("label")
    synthetic = upstream(context, "synthetic_videos")
    demos = upstream(context, "demonstrations")
    with step_lineage(context, flywheel, stage_params(label_config)) as lineage:
        meta = run_stage(context, "label_stage", flywheel.home_path, synthetic["path"], demos["path"], label_config)
        lineage.record(meta, inputs={"synthetic_videos": synthetic, "demonstrations": demos})
    return materialize(meta, inputs=input_keys(synthetic_videos=synthetic, demonstrations=demos),
                       links=lineage.metadata)
