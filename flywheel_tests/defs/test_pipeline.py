"""The whole graph materialized in-process on the tiny preset with a temporary Dagster instance; a failing
blocking gate stops downstream assets; re-materializing one asset reuses upstream results; the train
workload runs through Dagster Pipes in a subprocess and streams its logs and metadata back; every
materialization is an MLflow child run of its Dagster run's iteration run, the adapter is registered,
gated and promoted, and generation uses the champion."""

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
from flywheel.defs.resources import FlywheelResource, ModelSettings

TINY = ModelSettings(preset="tiny")  # these tests are sized for the tiny preset, not the default tiny-pusht

DOMAIN = "pusht-small"
FAST = {
    "demonstrations": {"min_episodes": 2, "min_val_episodes": 0, "allow_no_holdout": True},
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
    resources = {"flywheel": FlywheelResource(model=TINY, home=str(home)), "gpu": GpuLauncher(backend="in_process")}
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


def step_runs_of_dagster_run(home, dagster_run_id: str) -> tuple[object, dict]:
    """The MLflow iteration run tagged with a Dagster run id, and its child runs by asset."""
    from flywheel.lineage import runs, tracking

    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(DOMAIN)).experiment_id
    (parent,) = runs.find_runs(client, [experiment], {tracking.TAG_KIND: "iteration",
                                                      tracking.TAG_DAGSTER_RUN_ID: dagster_run_id})
    children = runs.find_runs(client, [experiment], {tracking.TAG_PARENT_RUN: parent.info.run_id})
    by_asset = {c.data.tags[tracking.TAG_ASSET]: c for c in children}
    assert len(by_asset) == len(children), "one child run per asset materialization"
    return parent, by_asset


def test_mlflow_iteration_run_with_a_child_run_per_asset(flywheel_run):
    from flywheel.lineage import runs, tracking

    _, result, home, _ = flywheel_run
    mats = materialized(result)
    parent, children = step_runs_of_dagster_run(home, result.run_id)
    assert parent.data.tags[tracking.TAG_ITERATION] == "1" and parent.info.status == "FINISHED"
    assert set(children) == set(iteration_assets())
    for name, child in children.items():
        tags = child.data.tags
        assert tags[tracking.TAG_PARTITION] == DOMAIN and tags[tracking.TAG_DAGSTER_RUN_ID] == result.run_id, name
        assert tags[tracking.TAG_CODE_VERSION].startswith("flywheel-") and child.info.status == "FINISHED", name
        # the asset links to its run: plain id, and a URL of the MLflow UI's run page
        assert mats[name]["mlflow_run_id"] == child.info.run_id, name
        assert mats[name]["mlflow_run_url"].endswith(f"/runs/{child.info.run_id}"), name
        assert mats[name]["mlflow_iteration_run_id"] == parent.info.run_id, name
    adapter_run = children["adapter"]
    assert adapter_run.data.params["steps"] == "10" and adapter_run.data.params["rank"] == "4"
    assert adapter_run.data.params["model.preset"] == "tiny"
    assert adapter_run.data.metrics["final_loss"] == pytest.approx(mats["adapter"]["final_loss"])
    losses = tracking.client(home).get_metric_history(adapter_run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 11))  # loss per training step
    # datasets in and out, identified by our content digests
    clips_data = {(d["name"], d["context"]): d for d in runs.dataset_inputs(home, children["training_clips"].info.run_id)}
    assert clips_data[("demonstrations", "training")]["digest"] == mats["demonstrations"]["key"]
    assert clips_data[("training_clips", "output")]["digest"] == mats["training_clips"]["key"]
    synthetic_data = {(d["name"], d["context"]) for d in runs.dataset_inputs(home, children["synthetic_videos"].info.run_id)}
    assert ("synthetic_set", "output") in synthetic_data
    refreshed = {(d["name"], d["context"]): d for d in runs.dataset_inputs(home, children["refreshed_dataset"].info.run_id)}
    assert refreshed[("refreshed_dataset", "output")]["digest"] == mats["refreshed_dataset"]["key"]


def test_adapter_registered_gated_and_generation_uses_the_champion(flywheel_run):
    import pandas as pd

    from flywheel.lineage import query, registry

    _, result, home, _ = flywheel_run
    mats = materialized(result)
    version = mats["adapter"]["mlflow_model_version"]
    assert mats["adapter"]["mlflow_model_version_url"].endswith(f"/versions/{version}")
    (row,) = [r for r in registry.list_adapters(home, DOMAIN) if r["version"] == version]
    assert "candidate" in row["aliases"] and row["training_dataset_digest"] == mats["training_clips"]["latent_cache_key"]
    gate_passed = mats["adapter_evaluation"]["gate_passed"]
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["adapter_beats_base"]
    assert check.passed is gate_passed  # the blocking check is the registry's gate decision
    assert (registry.champion_version(home, DOMAIN) == version) is gate_passed
    evaluated, base = registry.evaluation_of(home, DOMAIN, version)
    assert evaluated["psnr"] == pytest.approx(mats["adapter_evaluation"]["psnr_adapter"])
    assert base["psnr"] == pytest.approx(mats["adapter_evaluation"]["psnr_base"])
    assert gate_passed, "the FAST schedule is tuned to pass the gate; the rest of this test needs a champion"
    synthetic = mats["synthetic_videos"]
    assert synthetic["generated_with"] == f"champion v{version}" and synthetic["mlflow_model_version"] == version

    # which adapter version, base model, prompt and seed produced a synthetic episode
    sample = pd.read_parquet(Path(synthetic["path"]) / "samples.parquet").iloc[0]
    found = query.lineage_of_synthetic_episode(home, DOMAIN, synthetic_set_digest=synthetic["key"],
                                               episode_id=sample.request_id)
    assert found["adapter"]["version"] == version and found["seed"] == int(sample.seed)
    assert found["prompt"] == sample.prompt and found["base_model_id"] == found["adapter"]["base_model_id"] != ""
    refreshed = mats["refreshed_dataset"]
    first_synthetic = refreshed["real_episodes"]  # synthetic episodes follow the real ones
    if refreshed["synthetic_episodes"]:  # the same answer through the refreshed dataset version
        by_dataset = query.lineage_of_synthetic_episode(home, DOMAIN, dataset_digest=refreshed["key"],
                                                        episode_index=first_synthetic)
        assert by_dataset["adapter"]["version"] == version and by_dataset["synthetic_set_digest"] == synthetic["key"]
    else:  # the tiny model's videos rarely pass the filters: the version's record is found, and says so
        with pytest.raises(LookupError, match="is not a synthetic episode"):
            query.lineage_of_synthetic_episode(home, DOMAIN, dataset_digest=refreshed["key"],
                                               episode_index=first_synthetic)


def test_the_domains_next_demonstrations_are_its_refreshed_version(flywheel_run):
    """refreshed_dataset records itself in the domain's registration; demonstrations without a Launchpad
    source ingest it (the wheel turns); follow_refreshed: false goes back to the registered source."""
    from flywheel.defs.domains import registration

    instance, _, home, resources = flywheel_run
    refreshed = latest(instance, "refreshed_dataset")
    assert refreshed["next_iteration_ingests_it"] is True
    assert registration(home, DOMAIN)["refreshed"] == str(Path(refreshed["path"]).resolve())
    gate = {"min_episodes": 2, "min_val_episodes": 0, "allow_no_holdout": True}
    mats = materialized(dg.materialize(assets_named("demonstrations"), partition_key=DOMAIN, instance=instance,
                                       resources=resources, run_config={"ops": {"demonstrations": {"config": gate}}}))
    demos = mats["demonstrations"]
    assert Path(demos["dataset_root"]).resolve() == Path(refreshed["path"]).resolve()
    assert demos["episodes"] == refreshed["real_episodes"] + refreshed["synthetic_episodes"]
    assert demos["key"] != latest(instance, "refreshed_dataset")["inputs"]["demonstrations"]

    # This domain has no registered source and no inbox folder: without the refreshed version there is nothing.
    back = dg.materialize(assets_named("demonstrations"), partition_key=DOMAIN, instance=instance,
                          resources=resources, raise_on_error=False,
                          run_config={"ops": {"demonstrations": {"config": {**gate, "follow_refreshed": False}}}})
    assert not back.success
    (failure,) = [e for e in back.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error
    assert error.cause.cls_name == "FileNotFoundError" and "has no demonstrations" in error.cause.message


def test_rematerializing_synthetic_videos_reuses_upstream(flywheel_run, small_pusht):
    instance, _, home, resources = flywheel_run
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
    # an experiment is a Dagster run of its own: its own MLflow iteration run with one child run
    parent, children = step_runs_of_dagster_run(home, result.run_id)
    assert list(children) == ["synthetic_videos"] and int(parent.data.tags["flywheel.iteration"]) >= 2
    assert mats["synthetic_videos"]["mlflow_run_id"] == children["synthetic_videos"].info.run_id


def test_synthetic_videos_adapter_choice_base_or_registry_version(flywheel_run):
    instance, _, _, resources = flywheel_run
    version = latest(instance, "adapter")["mlflow_model_version"]
    config = {"seeds": [0], "max_videos": 1}
    for choice, label in (("base", "base"), (version, f"v{version}")):
        run = {"ops": {"synthetic_videos": {"config": {**config, "adapter": choice}}}}
        mats = materialized(dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                                           resources=resources, run_config=run))
        assert mats["synthetic_videos"]["generated_with"] == label
        assert (mats["synthetic_videos"].get("mlflow_model_version") == version) is (choice != "base")
    missing = dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                             resources=resources, raise_on_error=False,
                             run_config={"ops": {"synthetic_videos": {"config": {**config, "adapter": "999"}}}})
    assert not missing.success
    (failure,) = [e for e in missing.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "has no version '999'" in failure.event_specific_data.error.message


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
    resources = {"flywheel": FlywheelResource(model=TINY, home=str(home), gpus=1), "gpu": GpuLauncher(backend="subprocess")}
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
    resources = {"flywheel": FlywheelResource(model=TINY, home=str(tmp_path / "home")), "gpu": GpuLauncher(backend="in_process")}
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
