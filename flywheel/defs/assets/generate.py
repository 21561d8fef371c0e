"""synthetic_videos: image-to-world rollouts from clip first frames with the adapter (a GPU step).

To experiment, re-materialize this asset alone with other seeds or another adapter: the upstream clips
and adapters are reused, only the generation runs.
"""

from pathlib import Path

import dagster as dg

from flywheel.defs.config import stage_settings
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.pipes import GPU_RETRY_POLICY, GpuLauncher, only_transient_gpu_errors_retry
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import input_keys, materialize, upstream

GenerateSettings = stage_settings(
    "generate", "GenerateSettings",
    launchpad_only={
        "adapter": (str, "latest", "which adapter: 'latest' (this domain's latest `adapter`), 'base' (no adapter), "
                                   "an adapter key under <home>/adapters, or an adapter directory"),
    },
)


def choose_adapter(context, choice: str, home: Path) -> tuple[str | None, dict]:
    """The adapter directory to generate with (None = the base model) and what to record about it."""
    if choice == "latest":
        meta = upstream(context, "adapter")
        return meta["path"], meta
    if choice == "base":
        return None, {"key": "base"}
    path = Path(choice).expanduser()
    if not path.is_dir():
        path = home / "adapters" / choice
    if not (path / "adapter_card.json").is_file():
        raise ValueError(f"adapter {choice!r}: no adapter_card.json at {path}; give 'latest', 'base', an adapter key "
                         f"(a folder name under {home / 'adapters'}) or an adapter directory")
    return str(path.resolve()), {"key": path.name}


@dg.asset(
    name="synthetic_videos",
    group_name="generate",
    partitions_def=domain_partitions,
    deps=["adapter_evaluation", "adapter", "training_clips"],
    pool="gpu",
    retry_policy=GPU_RETRY_POLICY,
    kinds={"pytorch", "video"},
    description="Synthetic videos generated from the training clips' first frames (<home>/synthetic/<key>: "
                "samples.parquet, videos/*.mp4, contact_sheet.png). Runs as a Pipes workload on a GPU.",
)
def synthetic_videos(context: dg.AssetExecutionContext, config: GenerateSettings, flywheel: FlywheelResource,
                     gpu: GpuLauncher):
    with only_transient_gpu_errors_retry():
        generate_config = config.to_core("generate")
        model = flywheel.model_config_core()
        adapter_path, adapter = choose_adapter(context, config.adapter, flywheel.home_path)
        clips = upstream(context, "training_clips")
        args = {"adapter": adapter_path, "clip_set": clips["path"], "generate": generate_config.model_dump(mode="json"),
                "model": model.model_dump(mode="json")}
        meta = gpu.run_workload(context, "generate", args, flywheel)
    return materialize(meta, inputs=input_keys(adapter=adapter, training_clips=clips), preview_title="contact sheet")
