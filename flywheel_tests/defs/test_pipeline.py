"""The whole graph materialized in-process on the tiny preset with a temporary Dagster instance; a failing
blocking gate stops downstream assets; re-materializing one asset reuses upstream results; the train
workload runs through Dagster Pipes in a subprocess and streams its logs and metadata back."""

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from flywheel.defs.assets import FLYWHEEL_ASSETS
from flywheel.defs.jobs import iteration_assets
from flywheel.defs.pipes import GpuLauncher
from flywheel.defs.resources import FlywheelResource

DOMAIN = "pusht-small"
FAST = {
    "demonstrations": {"min_episodes": 2, "min_val_episodes": 0},
    "training_clips": {"max_clips_per_episode": 1},
    # a short, hot schedule: enough for the adapter to beat the base model (the evaluation gate) on the tiny preset
    "adapter": {"steps": 10, "learning_rate": 0.02, "warmup_steps": 1, "f_max": 1.0, "f_min": 1.0,
                "checkpoint_every": 5, "rank": 4, "alpha": 4},
    "adapter_evaluation": {"max_clips": 1},
    "synthetic_videos": {"seeds": [0], "max_videos": 2},
    "pseudo_actions": {"idm": {"steps": 4, "batch_size": 8}},
    "curated_trajectories": {"min_pass_rate": 0.0},  # the tiny model's 2-step adapter makes no usable video
    "refreshed_dataset": {"usefulness_report": False},
}


def assets_named(*names):
    return [a for a in FLYWHEEL_ASSETS if a.key.path[-1] in names]


def run_config(source: Path, selected: list[str], **overrides) -> dict:
    ops = {name: {"config": dict(cfg)} for name, cfg in FAST.items() if name in selected}
    ops["demonstrations"]["config"]["source"] = str(source)
    for name, cfg in overrides.items():
        ops.setdefault(name, {"config": {}})["config"].update(cfg)
    return {"ops": ops}


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.path[-1]] = {k: v.value for k, v in mat.metadata.items()}
    return out


def latest(instance, asset: str, domain: str = DOMAIN) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[domain]), limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def small_pusht(tmp_path_factory) -> Path:
    """A real 4-episode PushT LeRobot v3.0 dataset from the simulator (the embedded sample's generator)."""
    import os

    os.environ.setdefault("SVT_LOG", "1")
    from flywheel.data.pusht_sample import PushTSampleConfig, write_pusht_dataset

    return write_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht_small",
                               PushTSampleConfig(episodes=4, max_steps=40), progress=lambda _: None)


@pytest.fixture(scope="module")
def flywheel_run(small_pusht, tmp_path_factory):
    """One in-process materialization of every asset in this build, shared by the tests below."""
    import torch

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    resources = {"flywheel": FlywheelResource(home=str(home)), "gpu": GpuLauncher(backend="in_process")}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [DOMAIN])
        result = dg.materialize(assets_named(*iteration_assets()), partition_key=DOMAIN, instance=instance,
                                resources=resources, run_config=run_config(small_pusht, iteration_assets()))
        yield instance, result, home, resources


def test_whole_graph_materializes_with_paths_keys_and_previews(flywheel_run):
    instance, result, home, _ = flywheel_run
    assert result.success
    mats = materialized(result)
    assert set(mats) == set(iteration_assets())
    for name, meta in mats.items():
        assert Path(meta["path"]).is_dir() and str(meta["path"]).startswith(str(home)), name
        assert meta["key"] and meta["reused"] is False and meta["size_mb"] > 0, name
    assert mats["demonstrations"]["episodes"] == 4
    assert mats["demonstrations"]["splits"]["train"] >= 1
    assert Path(mats["training_clips"]["latent_cache"]).is_dir()
    assert mats["training_clips"]["inputs"] == {"demonstrations": mats["demonstrations"]["key"]}
    adapter = mats["adapter"]
    assert (Path(adapter["path"]) / "pytorch_lora_weights.safetensors").is_file()
    assert adapter["steps"] == 10 and math.isfinite(adapter["final_loss"])
    assert adapter["preview_image"].startswith("![loss](data:image/png;base64,")
    assert mats["adapter_evaluation"]["passed"] is True
    synthetic = mats["synthetic_videos"]
    assert synthetic["videos"] == 2
    assert len(list((Path(synthetic["path"]) / "videos").glob("*.mp4"))) == 2
    assert synthetic["preview_image"].startswith("![contact sheet](data:image/")
    assert synthetic["inputs"] == {"adapter": adapter["key"], "training_clips": mats["training_clips"]["key"]}
    # the data version of each asset is its artifact's content key
    assert instance.get_latest_data_version_record(dg.AssetKey("adapter"), partition_key=DOMAIN) is not None


def test_gates_ran_and_passed(flywheel_run):
    _, result, _, _ = flywheel_run
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    expected = {"schema_and_episode_counts", "loss_is_finite", "adapter_beats_base", "pass_rate_within_bounds",
                "loads_with_lerobot"}
    expected = {name for name in expected if name in checks or not name.startswith(("pass_rate", "loads"))}
    assert set(checks) == expected
    assert all(check.passed for check in checks.values()), {n: c.description for n, c in checks.items()}
    if "loads_with_lerobot" in checks:  # the refreshed dataset opened with LeRobotDataset, real episodes intact
        loaded = {k: v.value for k, v in checks["loads_with_lerobot"].metadata.items()}
        refreshed = materialized(result)["refreshed_dataset"]
        assert loaded["episodes"] == refreshed["real_episodes"] + refreshed["synthetic_episodes"] >= 4


def test_rematerializing_synthetic_videos_reuses_upstream(flywheel_run, small_pusht):
    instance, _, _, resources = flywheel_run
    adapter_before = latest(instance, "adapter")
    clips_before = latest(instance, "training_clips")
    config = {"ops": {"synthetic_videos": {"config": {"seeds": [0, 1], "max_videos": 3}}}}
    result = dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                            resources=resources, run_config=config)
    assert result.success
    mats = materialized(result)
    assert list(mats) == ["synthetic_videos"]  # nothing upstream ran again
    assert mats["synthetic_videos"]["videos"] == 3
    assert mats["synthetic_videos"]["inputs"] == {"adapter": adapter_before["key"], "training_clips": clips_before["key"]}
    # the same experiment again: the artifact is reused, not regenerated
    again = materialized(dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                                        resources=resources, run_config=config))
    assert again["synthetic_videos"]["reused"] is True
    assert again["synthetic_videos"]["key"] == mats["synthetic_videos"]["key"]


def test_invalid_config_fails_before_any_gpu_work_and_is_not_retried(flywheel_run):
    instance, _, _, resources = flywheel_run
    result = dg.materialize(assets_named("adapter"), partition_key=DOMAIN, instance=instance, resources=resources,
                            run_config={"ops": {"adapter": {"config": {"rank": 0}}}}, raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1
    assert "rank: Input should be greater than 0" in failures[0].event_specific_data.error.message
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert not any("workload" in m for m in logs)  # nothing was launched


def test_train_workload_through_pipes_streams_logs_and_metadata(flywheel_run, monkeypatch, tmp_path_factory):
    instance, _, home, _ = flywheel_run
    # the workload is a fresh Python importing torch: let it cache bytecode (the suite may disable writing it)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "flywheel-test-pycache"))
    resources = {"flywheel": FlywheelResource(home=str(home), gpus=1), "gpu": GpuLauncher(backend="subprocess")}
    config = {"ops": {"adapter": {"config": {"steps": 3, "checkpoint_every": 2, "rank": 4, "alpha": 4}}}}
    result = dg.materialize(assets_named("adapter"), partition_key=DOMAIN, instance=instance, resources=resources,
                            run_config=config)
    assert result.success
    meta = materialized(result)["adapter"]
    assert meta["steps"] == 3 and math.isfinite(meta["final_loss"]) and meta["reused"] is False
    assert (Path(meta["path"]) / "adapter_card.json").is_file()
    assert meta["preview_image"].startswith("![loss](data:image/png;base64,")
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("train workload started" in m for m in logs), logs
    assert any("stage=train" in m and "loss=" in m for m in logs)  # progress streamed from the subprocess
    assert any("running train workload on GPU 0" in m for m in logs)


def test_a_failing_blocking_gate_stops_downstream_assets(small_pusht, tmp_path):
    resources = {"flywheel": FlywheelResource(home=str(tmp_path / "home")), "gpu": GpuLauncher(backend="in_process")}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [DOMAIN])
        selected = ["demonstrations", "training_clips", "adapter"]
        result = dg.materialize(assets_named(*selected), partition_key=DOMAIN, instance=instance, resources=resources,
                                raise_on_error=False,
                                run_config=run_config(small_pusht, selected, demonstrations={"min_episodes": 1000}))
        assert not result.success
        assert list(materialized(result)) == ["demonstrations"]  # recorded, but nothing downstream ran
        (check,) = result.get_asset_check_evaluations()
        assert check.check_name == "schema_and_episode_counts" and check.passed is False
        assert "4 episodes, the gate wants at least 1000" in check.description
        step_events = {e.step_key: e.event_type_value for e in result.all_events if e.step_key}
        assert "training_clips" not in step_events or step_events["training_clips"] != "STEP_SUCCESS"


def test_workload_runs_standalone_without_dagster(flywheel_run):
    """The same entrypoint by hand: the adapter of the graph run is found in the store, not retrained."""
    from flywheel.defs.assets.train import TrainSettings

    instance, result, home, resources = flywheel_run
    graph = materialized(result)
    args = {"latent_cache": graph["training_clips"]["latent_cache"],
            "train": TrainSettings(**FAST["adapter"]).to_core("train").model_dump(mode="json"),
            "model": resources["flywheel"].model_config_core().model_dump(mode="json")}
    proc = subprocess.run([sys.executable, "-m", "flywheel.workloads.train", "--home", str(home),
                           "--config-json", json.dumps(args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["reused"] is True and out["key"] == graph["adapter"]["key"] and out["path"] == graph["adapter"]["path"]
