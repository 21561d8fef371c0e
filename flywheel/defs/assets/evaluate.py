"""adapter_evaluation: the adapter against the base model on held-out clips (a GPU step, a blocking gate)."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import default_sections, stage_settings
from flywheel.defs.lineage import stage_params, stage_result, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.quality.config import FilterConfig

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
                             "the registry's gate: the adapter beats the base model's PSNR by min_psnr_gain_db and trails "
                             "the domain's champion by at most max_psnr_drop_vs_champion_db (passing promotes it)")],
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
        # the video filters' pass rates of both sides use the embedded default filter settings (the curate
        # step's Launchpad settings apply to curation itself)
        quality = FilterConfig.model_validate(default_sections().get("quality", {}))
        args = {"adapter": adapter["path"], "clip_set": clips["path"], "evaluate": evaluate_config.model_dump(mode="json"),
                "generate": generate_config.model_dump(mode="json"), "model": model.model_dump(mode="json"),
                "quality": quality.model_dump(mode="json")}
        params = stage_params(evaluate_config, model, generate=generate_config.model_dump(mode="json"))
        with step_lineage(context, flywheel, params) as lineage:
            meta = gpu.run_workload(context, "evaluate", args, flywheel)
            lineage.record(meta, inputs={"training_clips": clips})
            version = registered_version(lineage, adapter, clips)
            # base vs adapter metrics on the version; `champion` moves only when the gate passes
            decision = lineage.lineage.gate_and_promote(version, meta, evaluate_config)
            lineage.run.log_metrics({"gate_passed": float(decision.passed)})
            lineage.link_model_version(version)
            lineage.metadata["gate_passed"] = dg.MetadataValue.bool(decision.passed)
            lineage.metadata["gate_reasons"] = dg.MetadataValue.text("; ".join(decision.reasons) or "passed")
            context.log.info(f"adapter version {version}: gate {'passed -> champion' if decision.passed else 'failed'}"
                             + (f" ({'; '.join(decision.reasons)})" if decision.reasons else ""))
    return materialize(meta, inputs=input_keys(adapter=adapter, training_clips=clips),
                       check_results=[checks.evaluation_check(meta, decision)], preview_title="base vs adapter vs real",
                       links=lineage.metadata)


def registered_version(lineage, adapter: dict, clips: dict) -> str:
    """The adapter's registry version: from its materialization, else registered now (idempotent on content)."""
    version = adapter.get("mlflow_model_version")
    if version:
        return str(version)
    result = stage_result(adapter)
    return lineage.lineage.register_adapter(lineage.run, result, str(clips.get("latent_cache_key") or clips["key"]))
