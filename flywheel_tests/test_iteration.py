"""The main job end to end: one flywheel iteration on the embedded default (tiny-pusht base, rotated-camera PushT),
its rerun from cache, and `flywheel iterate --iterations 2` turning the wheel once more."""

import json
from pathlib import Path

import pandas as pd

from flywheel.cli import DEFAULT_CONFIG, main
from flywheel.data.ingest import load_manifest
from flywheel.config import load_config
from flywheel.iteration import STAGE_ORDER, run_iteration

FAST = {
    "clips": {"max_clips_per_episode": 1},
    "train": {"steps": 4, "rank": 4, "alpha": 4, "checkpoint_every": 2},
    "evaluate": {"max_clips": 1},
    "generate": {"seeds": [0], "max_videos": 3, "num_inference_steps": 2},
    "label": {"idm": {"steps": 20, "batch_size": 8}},
    "refresh": {"usefulness_report": False},
}


def test_full_iteration_runs_every_stage_reruns_from_cache_and_chains(tmp_path, capfd):
    overrides = {**FAST, "home": str(tmp_path / "home")}
    config = load_config(DEFAULT_CONFIG, overrides)
    lines = []
    results = run_iteration(config, log=lines.append)
    printed = capfd.readouterr().err
    assert "moov atom" not in printed and "libx264 @" not in printed, "FFmpeg's notes reached the terminal"

    assert list(results) == STAGE_ORDER
    for name, result in results.items():
        assert result.path.exists(), name
    assert config.domain == "pusht-rotated" and config.model.preset == "tiny-pusht"
    assert results["demonstrations"].metadata["episodes"] == 10
    assert (results["adapter"].path / "pytorch_lora_weights.safetensors").is_file()
    samples = pd.read_parquet(results["synthetic_videos"].path / "samples.parquet")
    assert len(samples) == 3 and all((results["synthetic_videos"].path / v).is_file() for v in samples["video"])
    curated = pd.read_parquet(results["curated_trajectories"].path / "results.parquet")
    assert len(curated) == 3 and "reasons" in curated and "accepted" in curated
    assert results["refreshed_dataset"].metadata["synthetic_episodes"] == int(curated["accepted"].sum())
    summary = json.loads(sorted((tmp_path / "home" / "iterations" / "pusht-rotated").glob("*.json"))[-1].read_text())
    assert summary["iteration"] == 1 and summary["adapter_version"] == "1"
    assert any("gate" in line for line in lines)

    # `flywheel iterate --iterations 2` with the same settings: the first iteration is the one above again
    # (every stage reused from the content-addressed store, no duplicate adapter version); the second
    # ingests its refreshed dataset version and trains adapter v2 on it.
    sets = [f"--set={section}.{name}={json.dumps(value)}" for section, values in FAST.items()
            for name, value in values.items()]
    assert main(["iterate", "--iterations", "2", "--home", str(tmp_path / "home"), *sets]) == 0
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "home" / "iterations" / "pusht-rotated").glob("*.json"))]
    chained_first, chained_second = summaries[-2], summaries[-1]
    assert chained_second["iteration"] == chained_first["iteration"] + 1
    again = chained_first["stages"]
    assert all(r["reused"] or name in ("demonstrations", "training_clips", "refreshed_dataset")
               for name, r in again.items())
    assert {k: v["key"] for k, v in again.items() if k != "synthetic_videos"} == {
        k: v.key for k, v in results.items() if k != "synthetic_videos"}
    from flywheel.lineage.registry import list_adapters

    assert sorted(str(v["version"]) for v in list_adapters(tmp_path / "home", "pusht-rotated")) == ["1", "2"]
    assert chained_second["adapter_version"] == "2"
    demos = load_manifest(chained_second["stages"]["demonstrations"]["path"])
    assert Path(demos.summary["dataset_root"]).resolve() == results["refreshed_dataset"].path.resolve()
    synthetic = results["refreshed_dataset"].metadata["synthetic_episodes"]
    assert len(demos.frame) == 10 + synthetic and int(demos.frame["is_synthetic"].sum()) == synthetic
    assert (demos.frame.loc[demos.frame["is_synthetic"], "split"] == "train").all()
    real = demos.frame[~demos.frame["is_synthetic"]].set_index("episode_id")["split"].sort_index()
    before = load_manifest(results["demonstrations"].path).frame.set_index("episode_id")["split"].sort_index()
    assert real.to_dict() == before.to_dict(), "real episodes must keep their train/val/test split"


def test_a_version_that_failed_the_usefulness_gate_is_not_built_on():
    from flywheel.iteration import why_not_build_on

    failed = {"synthetic_episodes": 2, "usefulness_gate_passed": False, "usefulness_report": "/home/reports/u/v1"}
    assert "failed the usefulness gate" in why_not_build_on(failed) and "/home/reports/u/v1" in why_not_build_on(failed)
    assert why_not_build_on({"synthetic_episodes": 2, "usefulness_gate_passed": True}) is None
    assert why_not_build_on({"synthetic_episodes": 0}) is None  # no report asked for: nothing known against it
