"""training_clips: episodes -> fixed-size clips + the VAE latent / text-embedding cache (a GPU step)."""

import dagster as dg

from flywheel.defs.config import stage_settings
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream

ClipSettings = stage_settings("clips", "ClipSettings")


@dg.asset(
    name="training_clips",
    group_name="clips",
    partitions_def=domain_partitions,
    deps=["demonstrations"],
    pool="gpu",
    retry_policy=GPU_RETRY_POLICY,
    kinds={"pytorch", "video"},
    description="Training clips cut from the demonstrations, with their cached VAE latents and text embeddings "
                "(<home>/clips/<key>; metadata `latent_cache`). Encoding runs as a Pipes workload on a GPU.",
)
def training_clips(context: dg.AssetExecutionContext, config: ClipSettings, flywheel: FlywheelResource,
                   gpu: GpuLauncher):
    with only_transient_gpu_errors_retry():
        clip_config = config.to_core("clips")  # invalid values fail here, before any GPU work
        model = flywheel.model_config_core()
        demos = upstream(context, "demonstrations")
        args = {"manifest": demos["path"], "clips": clip_config.model_dump(mode="json"),
                "model": model.model_dump(mode="json")}
        with step_lineage(context, flywheel, stage_params(clip_config, model)) as lineage:
            meta = gpu.run_workload(context, "clips", args, flywheel)
            lineage.record(meta, inputs={"demonstrations": demos})
    return materialize(meta, inputs=input_keys(demonstrations=demos), links=lineage.metadata)
