"""The main job end to end: one flywheel iteration on the embedded default (tiny-pusht base, rotated-camera PushT)."""

import json

import pandas as pd

from flywheel.cli import DEFAULT_CONFIG
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


def test_full_iteration_runs_every_stage_and_reruns_from_cache(tmp_path):
    overrides = {**FAST, "home": str(tmp_path / "home")}
    config = load_config(DEFAULT_CONFIG, overrides)
    lines = []
    results = run_iteration(config, log=lines.append)

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

    # The same config again: every stage is reused from the content-addressed store, and the
    # adapter registry gets no duplicate version.
    again = run_iteration(config, log=lines.append)
    assert all(r.reused or r.stage in ("demonstrations", "training_clips", "refreshed_dataset") for r in again.values())
    assert {k: v.key for k, v in again.items() if k != "synthetic_videos"} == {
        k: v.key for k, v in results.items() if k != "synthetic_videos"}
    from flywheel.lineage.registry import list_adapters

    assert [str(v["version"]) for v in list_adapters(tmp_path / "home", "pusht-rotated")] == ["1"]
