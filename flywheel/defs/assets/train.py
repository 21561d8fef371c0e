"""adapter: a LoRA/DoRA adapter trained on the cached clips of the frozen world model (a GPU step)."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import stage_settings
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream

TrainSettings = stage_settings(
    "train", "TrainSettings",
    launchpad_only={
        "continue_adapter_line": (bool, False, "start from this domain's latest adapter (sets init_adapter) "
                                               "instead of from scratch"),
    },
)


@dg.asset(
    name="adapter",
    group_name="train",
    partitions_def=domain_partitions,
    deps=["training_clips"],
    pool="gpu",
    retry_policy=GPU_RETRY_POLICY,
    check_specs=[checks.spec("adapter", checks.ADAPTER_CHECK, "the training loss is finite")],
    kinds={"pytorch", "safetensors"},
    description="A LoRA/DoRA adapter (<home>/adapters/<key>: pytorch_lora_weights.safetensors, adapter_card.json, "
                "loss.png). Trains as a Pipes workload on a GPU; a retried step resumes from its last checkpoint.",
)
def adapter(context: dg.AssetExecutionContext, config: TrainSettings, flywheel: FlywheelResource, gpu: GpuLauncher):
    with only_transient_gpu_errors_retry():
        overrides = {}
        if config.continue_adapter_line and not config.init_adapter:
            overrides["init_adapter"] = upstream(context, "adapter")["path"]
        train_config = config.to_core("train", **overrides)  # invalid values fail here, before any GPU work
        model = flywheel.model_config_core()
        clips = upstream(context, "training_clips")
        args = {"latent_cache": clips["latent_cache"], "train": train_config.model_dump(mode="json"),
                "model": model.model_dump(mode="json")}
        params = stage_params(train_config, model, continue_adapter_line=config.continue_adapter_line)
        with step_lineage(context, flywheel, params) as lineage:
            meta = gpu.run_workload(context, "train", args, flywheel)
            result = lineage.record(meta, inputs={"training_clips": clips})
            # a candidate version of the domain's adapter line (the same files again: the same version)
            version = lineage.lineage.register_adapter(lineage.run, result, str(clips["latent_cache_key"]))
            lineage.link_model_version(version)
            context.log.info(f"registered adapter as version {version} (alias candidate)")
    return materialize(meta, inputs=input_keys(training_clips=clips), check_results=[checks.adapter_check(meta)],
                       preview_title="loss", links=lineage.metadata)
