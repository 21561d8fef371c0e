"""adapter_evaluation: the adapter against the base model on held-out clips (a GPU step, a blocking gate)."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import stage_settings
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream

# The sampler settings of the base/adapter generations: the generate section, as synthetic_videos has it.
SamplerSettings = stage_settings("generate", "EvaluateSamplerSettings")
EvaluateSettings = stage_settings(
    "evaluate", "EvaluateSettings",
    launchpad_only={
        "generate": (SamplerSettings, SamplerSettings(), "sampler settings of the base/adapter generations "
                                                         "(as for synthetic_videos; the seeds are `seeds` above)"),
    },
)


@dg.asset(
    name="adapter_evaluation",
    group_name="evaluate",
    partitions_def=domain_partitions,
    deps=["adapter", "training_clips"],
    pool="gpu",
    retry_policy=GPU_RETRY_POLICY,
    check_specs=[checks.spec("adapter_evaluation", checks.EVALUATION_CHECK,
                             "the adapter beats the base model's PSNR by at least min_psnr_gain_db")],
    kinds={"pytorch"},
    description="PSNR/SSIM of base vs adapter generations against the real held-out clips "
                "(<home>/evaluations/<key>, comparison.png). Blocks generation when the adapter does not pass.",
)
def adapter_evaluation(context: dg.AssetExecutionContext, config: EvaluateSettings, flywheel: FlywheelResource,
                       gpu: GpuLauncher):
    with only_transient_gpu_errors_retry():
        evaluate_config = config.to_core("evaluate")
        model = flywheel.model_config_core()
        adapter = upstream(context, "adapter")
        clips = upstream(context, "training_clips")
        generate_config = config.generate.to_core("generate")
        args = {"adapter": adapter["path"], "clip_set": clips["path"], "evaluate": evaluate_config.model_dump(mode="json"),
                "generate": generate_config.model_dump(mode="json"), "model": model.model_dump(mode="json")}
        meta = gpu.run_workload(context, "evaluate", args, flywheel)
    return materialize(meta, inputs=input_keys(adapter=adapter, training_clips=clips),
                       check_results=[checks.evaluation_check(meta)], preview_title="base vs adapter vs real")
