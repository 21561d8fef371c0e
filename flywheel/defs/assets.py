"""The flywheel as Dagster assets: one per stage of flywheel.pipeline.STAGES, all made by `stage_asset`.

    demonstrations -> training_clips -> adapter -> adapter_evaluation -> synthetic_videos
      -> pseudo_actions -> curated_trajectories -> refreshed_dataset

Every asset is partitioned by domain and does the same five things: read its upstream results (the latest
materialization for the domain), let flywheel.decisions prepare the step (resolve the source, choose the
generating adapter, ...), run the stage (in the step process, or as a Pipes workload in the `gpu` pool for
GPU stages), let flywheel.decisions decide on the result (register, gate, promote, accept, build on), and
report the result with its decisions as asset checks. The MLflow child run of the materialization records
all of it. No stage-specific code lives here: a stage is declared once, in flywheel.pipeline.
"""


import time

import dagster as dg

from flywheel import decisions
from flywheel.defs import checks
from flywheel.defs.lineage import iteration_lineage, model_version_links, stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import latest, materialize, upstream
from flywheel.defs.terminal import stage_progress
from flywheel.pipeline import STAGE_LIST, Stage, headline

GPU_POOL = "gpu"
KINDS = {"demonstrations": {"lerobot", "parquet"}, "training_clips": {"pytorch", "video"},
         "adapter": {"pytorch", "safetensors"}, "adapter_evaluation": {"pytorch"}, "synthetic_videos": {"pytorch", "video"},
         "pseudo_actions": {"pytorch", "parquet"}, "curated_trajectories": {"parquet"}, "refreshed_dataset": {"lerobot"}}


def stage_asset(stage: Stage) -> dg.AssetsDefinition:
    @dg.asset(
        name=stage.asset,
        group_name=stage.command,
        partitions_def=domain_partitions,
        deps=[*stage.upstream, *stage.after],
        pool=GPU_POOL if stage.gpu else None,
        retry_policy=GPU_RETRY_POLICY if stage.gpu else None,
        check_specs=checks.specs(stage),
        kinds=KINDS.get(stage.asset),
        description=f"{stage.help[:1].upper()}{stage.help[1:]}. {stage.description}",
    )
    def _materialize(context: dg.AssetExecutionContext, flywheel: FlywheelResource, gpu: GpuLauncher):
        with only_transient_gpu_errors_retry():
            return run_step(context, stage, flywheel, gpu)

    return _materialize


def run_step(context: dg.AssetExecutionContext, stage: Stage, flywheel: FlywheelResource,
             gpu: GpuLauncher) -> dg.MaterializeResult:
    domain = context.partition_key
    config = flywheel.flywheel_config(domain)  # an invalid Launchpad value fails here, before any work
    step = decisions.Step(home=flywheel.home_path, domain=domain, config=config,
                          inputs={name: upstream(context, name) for name in stage.upstream},
                          lineage=iteration_lineage(context, flywheel), actor=actor_of(context),
                          inbox=flywheel.inbox_path, latest=lambda asset: latest(context, asset))
    if stage.prepare is not None:
        try:
            stage.prepare(step)
        except BaseException:  # e.g. no source for the domain: the iteration run must not stay RUNNING
            step.lineage.finish("FAILED")
            raise
    started = time.perf_counter()
    with step_lineage(context, step, stage_params(step.config, stage.section)) as links:
        progress = stage_progress(context, stage.asset)
        if stage.gpu:
            result = gpu.run_stage(context, stage, step.inputs, step.config, flywheel, progress)
        else:
            result = stage.run(step.home, step.inputs, step.config, progress)
        step.lineage.record(step.run, result, [(name, r.key, str(r.path)) for name, r in step.inputs.items()
                                               if name in ("demonstrations", "training_clips", "synthetic_videos")][-1:])
        made = stage.decide(step, result) if stage.decide is not None else []
        version = result.metadata.get("registered_version")
        if version:
            links |= model_version_links(step.home, domain, str(version))
    verdict = "reused" if result.reused else f"done in {time.perf_counter() - started:.1f}s"
    summary = headline(result)
    context.log.info(f"[{stage.asset}] {verdict}: {result.path}" + (f"  ({summary})" if summary else ""))
    for decision in made:
        context.log.info(f"[{stage.asset}] {decision.line()}")
    return materialize(result, checks.results(stage, made, domain), stage.preview_title, links, step.inputs)


def actor_of(context: dg.AssetExecutionContext) -> str:
    """Who decides: the Dagster run (and its launcher, when the CLI or a schedule/sensor started it)."""
    tags = context.run.tags
    launcher = tags.get("flywheel/launched_by") or tags.get("dagster/schedule_name") or tags.get("dagster/sensor_name")
    return f"Dagster run {context.run.run_id[:8]}" + (f" ({launcher})" if launcher else "")


FLYWHEEL_ASSETS = [stage_asset(stage) for stage in STAGE_LIST]
