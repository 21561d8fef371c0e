"""synthetic_videos: image-to-world rollouts from clip first frames with the adapter (a GPU step).

By default the domain's MLflow `champion` generates (the base model while the domain has none). To
experiment, re-materialize this asset alone with other seeds or another adapter (`adapter: "3"`, "base",
"latest"): the upstream clips and adapters are reused, only the generation runs, logged as its own MLflow run.
"""

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from flywheel.defs.config import stage_settings
from flywheel.defs.lineage import iteration_lineage, stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream
from flywheel.lineage.recorder import IterationLineage

GenerateSettings = stage_settings(
    "generate", "GenerateSettings",
    launchpad_only={
        "adapter": (str, "champion", "which adapter: 'champion' (the domain's promoted adapter; the base model while "
                                     "there is none), 'base' (no adapter), a registry version such as '3', 'latest' "
                                     "(this domain's latest `adapter` materialization), an adapter key under "
                                     "<home>/adapters, or an adapter directory"),
    },
)


@dataclass
class AdapterChoice:
    path: str | None  # the adapter directory; None = the base model
    upstream: dict  # what `inputs` records about it (its key)
    version: str | None  # its registry version, when registered
    label: str  # e.g. "champion v3", "base", "v2"


def choose_adapter(context, choice: str, home: Path, lineage: IterationLineage) -> AdapterChoice:
    """The adapter to generate with, its registry version and what to record about it."""
    if choice == "champion":
        champion = lineage.champion()
        if champion is None:
            context.log.info(f"domain {lineage.domain!r} has no champion adapter yet: generating with the base model")
            return AdapterChoice(None, {"key": "base"}, None, "base (no champion yet)")
        version, path = champion
        return AdapterChoice(str(path), {"key": path.name}, version, f"champion v{version}")
    if choice == "base":
        return AdapterChoice(None, {"key": "base"}, None, "base")
    if choice.isdigit():
        path = lineage.adapter_dir(choice)
        return AdapterChoice(str(path), {"key": path.name}, choice, f"v{choice}")
    if choice == "latest":
        meta = upstream(context, "adapter")
        version = meta.get("mlflow_model_version") or lineage.version_of_adapter_dir(meta["path"])
        return AdapterChoice(meta["path"], meta, version and str(version), f"latest ({meta['key']})")
    path = Path(choice).expanduser()
    if not path.is_dir():
        path = home / "adapters" / choice
    if not (path / "adapter_card.json").is_file():
        raise ValueError(f"adapter {choice!r}: no adapter_card.json at {path}; give 'champion', 'base', a registry "
                         f"version (e.g. '3'), 'latest', an adapter key (a folder name under {home / 'adapters'}) "
                         "or an adapter directory")
    return AdapterChoice(str(path.resolve()), {"key": path.name}, lineage.version_of_adapter_dir(path), path.name)


@dg.asset(
    name="synthetic_videos",
    group_name="generate",
    partitions_def=domain_partitions,
    deps=["adapter_evaluation", "adapter", "training_clips"],
    pool="gpu",
    retry_policy=GPU_RETRY_POLICY,
    kinds={"pytorch", "video"},
    description="Synthetic videos generated from the training clips' first frames with the domain's champion "
                "adapter by default (<home>/synthetic/<key>: samples.parquet, videos/*.mp4, contact_sheet.png). "
                "Runs as a Pipes workload on a GPU.",
)
def synthetic_videos(context: dg.AssetExecutionContext, config: GenerateSettings, flywheel: FlywheelResource,
                     gpu: GpuLauncher):
    with only_transient_gpu_errors_retry():
        generate_config = config.to_core("generate")
        model = flywheel.model_config_core()
        lineage = iteration_lineage(context, flywheel)
        adapter = choose_adapter(context, config.adapter, flywheel.home_path, lineage)
        clips = upstream(context, "training_clips")
        args = {"adapter": adapter.path, "clip_set": clips["path"], "generate": generate_config.model_dump(mode="json"),
                "model": model.model_dump(mode="json")}
        params = stage_params(generate_config, model, adapter=config.adapter)
        with step_lineage(context, flywheel, params, lineage) as step:
            context.log.info(f"generating with {adapter.label}")
            meta = gpu.run_workload(context, "generate", args, flywheel)
            result = step.record(meta, inputs={"training_clips": clips})
            # per-episode prompt and seed, and the adapter version (or base model) that made them
            lineage.record_synthetic(step.run, result, adapter.version, model.preset)
            if adapter.version:
                step.link_model_version(adapter.version)
            step.metadata["generated_with"] = dg.MetadataValue.text(adapter.label)
    return materialize(meta, inputs=input_keys(adapter=adapter.upstream, training_clips=clips),
                       preview_title="contact sheet", links=step.metadata)
