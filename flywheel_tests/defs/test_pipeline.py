"""The whole graph materialized in-process on the tiny preset with a temporary Dagster instance; a failing
blocking check stops downstream assets; re-materializing one asset reuses upstream results; the train
stage runs through Dagster Pipes in a subprocess and streams its logs and metadata back; every
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

from flywheel.config import deep_merge
from flywheel.defs.assets import FLYWHEEL_ASSETS
from flywheel.defs.pipes import GpuLauncher
from flywheel.defs.resources import FlywheelResource, RunSettings
from flywheel.pipeline import STAGE_LIST

ALL = [s.asset for s in STAGE_LIST]
DOMAIN = "pusht-small"
FAST = {
    "model": {"preset": "tiny"},  # these tests are sized for the random tiny preset, not the default tiny-pusht
    "ingest": {"allow_no_holdout": True},
    "clips": {"max_clips_per_episode": 1},
    # a short, hot schedule: enough for the adapter to beat the base model (the adapter gate) on the tiny preset
    "train": {"steps": 10, "learning_rate": 0.02, "warmup_steps": 1, "f_max": 1.0, "f_min": 1.0,
              "checkpoint_every": 5, "rank": 4, "alpha": 4},
    "evaluate": {"max_clips": 1, "seeds": [0]},
    "generate": {"seeds": [0], "max_videos": 2},
    "label": {"idm": {"steps": 4, "batch_size": 8}},
    "refresh": {"usefulness_report": False},
    "gates": {"demonstrations": {"min_val_episodes": 0},
              "fit": {"enabled": False},  # random weights represent nothing: the fit check has its own tests
              # the tiny model's 2-step adapter videos are not judged by the filters or the usefulness here
              "adapter": {"max_filter_pass_rate_drop": 1.0, "max_ssim_drop": 1.0},
              "curation": {"min_pass_rate": 0.0},
              "refresh": {"build_on": ["better", "non-inferior", "inconclusive"]}},
    # where a GPU makes policy.evaluate: auto run the comparison: the plumbing's budget, not a measurement
    "policy": {"policy": {"steps": 2, "batch_size": 2}, "seeds": [0, 1],
               "rollout": {"episodes": 2, "max_steps": 5, "batch": 2, "video_episodes": 0}},
}


def assets_named(*names):
    return [a for a in FLYWHEEL_ASSETS if a.key.path[-1] in names]


def resources(home, source: Path | None = None, gpu: str = "in_process", gpus: int = 0, **changes) -> dict:
    run = deep_merge(FAST, changes)
    if source is not None:
        run = deep_merge(run, {"ingest": {"source": str(source)}})
    return {"flywheel": FlywheelResource(home=str(home), gpus=gpus, run=RunSettings(**run)),
            "gpu": GpuLauncher(backend=gpu)}


resources_for = resources


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


def failure_of(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.event_specific_data
    return data.user_failure_data.description if data.user_failure_data else data.error.message


@pytest.fixture(scope="module")
def small_pusht(tmp_path_factory) -> Path:
    """A real 4-episode PushT LeRobot v3.0 dataset from the simulator (the embedded sample's generator)."""
    from flywheel.pusht.sample import PushTSampleConfig, write_pusht_dataset

    return write_pusht_dataset(tmp_path_factory.mktemp("data") / "pusht_small",
                               PushTSampleConfig(episodes=4, max_steps=40), progress=lambda _: None)


@pytest.fixture(scope="module")
def flywheel_run(small_pusht, tmp_path_factory):
    """One in-process materialization of every asset, shared by the tests below."""
    import torch

    torch.set_num_threads(1)
    home = tmp_path_factory.mktemp("home")
    res = resources(home, small_pusht)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [DOMAIN])
        result = dg.materialize(assets_named(*ALL), partition_key=DOMAIN, instance=instance, resources=res)
        close(home, instance, result)
        yield instance, result, home, res


def close(home, instance, result) -> None:
    """What the run-status sensors do when a run ends (no daemon runs them in a test): end its MLflow parents."""
    from flywheel.defs.run_status import close_lineage_of_run

    close_lineage_of_run(home, instance.get_run_by_id(result.run_id))


def test_whole_graph_materializes_with_paths_keys_and_previews(flywheel_run):
    instance, result, home, _ = flywheel_run
    assert result.success
    mats = materialized(result)
    assert set(mats) == set(ALL)
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
    assert mats["adapter_evaluation"]["registered_version"] == "1"
    synthetic = mats["synthetic_videos"]
    assert synthetic["videos"] == 2
    assert len(list((Path(synthetic["path"]) / "videos").glob("*.mp4"))) == 2
    assert synthetic["preview_image"].startswith("![contact sheet](data:image/")
    assert synthetic["inputs"] == {"generating_adapter": adapter["key"], "training_clips": mats["training_clips"]["key"]}
    # the data version of each asset is its artifact's content key
    assert instance.get_latest_data_version_record(dg.AssetKey("adapter"), partition_key=DOMAIN) is not None
    # the closed-loop policy comparison is in the graph; without a GPU (auto) it is recorded as not evaluated
    policy = mats["policy_evaluation"]
    assert policy["inputs"] == {"refreshed_dataset": mats["refreshed_dataset"]["key"]}
    import torch

    if not torch.cuda.is_available():
        assert policy["evaluated"] is False and "opt in with --set policy.evaluate=on" in policy["not_evaluated"]


def test_gates_ran_and_passed(flywheel_run):
    import torch

    _, result, _, _ = flywheel_run
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(checks) == {c.name for s in STAGE_LIST for c in s.checks}
    # on a CPU, policy.evaluate: auto records that no policy was evaluated (a warning, not a stop) and why
    policy = checks.pop("policy_verdict")
    if not torch.cuda.is_available():
        assert not policy.passed and policy.description.startswith(
            "policy verdict failed: not evaluated: no GPU (policy.evaluate: auto runs it on a GPU only); opt in with "
            "--set policy.evaluate=on (takes ~")
    assert checks["build_on_policy"].description.startswith("not decided in this run")  # gates.refresh.evidence: idm
    assert all(check.passed for check in checks.values()), {n: c.description for n, c in checks.items()}
    assert checks["model_fits_the_data"].description.startswith("not decided in this run")  # turned off above
    # each check says who decided, for which domain, and every criterion with its threshold
    gate = {k: v.value for k, v in checks["adapter_gate"].metadata.items()}
    assert gate["domain"] == DOMAIN and gate["decided_by"].startswith("Dagster run ")
    assert gate["PSNR_gain_over_base_needs"] == "> 0 dB" and gate["PSNR_gain_over_base"] > 0
    assert checks["adapter_gate"].description.startswith("adapter gate passed: promoted to champion")
    # the refreshed dataset opened with LeRobotDataset, real episodes intact
    loaded = {k: v.value for k, v in checks["loads_with_lerobot"].metadata.items()}
    refreshed = materialized(result)["refreshed_dataset"]
    assert loaded["episodes_loaded"] == refreshed["real_episodes"] + refreshed["synthetic_episodes"] >= 4


def step_runs_of_dagster_run(home, dagster_run_id: str, kind: str = "iteration") -> tuple[object, dict]:
    """The MLflow parent run (an iteration, or an experiment) tagged with a Dagster run id, and its child runs
    by asset."""
    from flywheel.lineage import runs, tracking

    client = tracking.client(home)
    experiment = client.get_experiment_by_name(tracking.experiment_name(DOMAIN)).experiment_id
    (parent,) = runs.find_runs(client, [experiment], {tracking.TAG_KIND: kind,
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
    assert set(children) == set(ALL)
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
    assert adapter_run.data.tags["flywheel.decision.training"] == "passed"
    assert children["adapter_evaluation"].data.tags["flywheel.decision.adapter_gate"] == "passed"
    # (the asset's metadata shows 4 significant digits; MLflow and the artifact keep every digit)
    assert adapter_run.data.metrics["final_loss"] == pytest.approx(mats["adapter"]["final_loss"], rel=1e-3)
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
    version = mats["adapter"]["registered_version"]
    assert mats["adapter"]["mlflow_model_version"] == version
    assert mats["adapter"]["mlflow_model_version_url"].endswith(f"/versions/{version}")
    (row,) = [r for r in registry.list_adapters(home, DOMAIN) if r["version"] == version]
    assert "candidate" in row["aliases"] and row["training_dataset_digest"] == mats["training_clips"]["latent_cache_key"]
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["adapter_gate"]
    gate_passed = check.passed  # the blocking check is the gate decision the registry carried out
    assert (registry.champion_version(home, DOMAIN) == version) is gate_passed
    evaluated, base = registry.evaluation_of(home, DOMAIN, version)
    assert evaluated["psnr"] == pytest.approx(mats["adapter_evaluation"]["psnr_adapter"], rel=1e-3)
    assert base["psnr"] == pytest.approx(mats["adapter_evaluation"]["psnr_base"], rel=1e-3)
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
    from flywheel.domains import registration

    instance, _, home, resources = flywheel_run
    refreshed = latest(instance, "refreshed_dataset")
    assert refreshed["next_iteration_ingests_it"] is True
    assert registration(home, DOMAIN)["refreshed"] == str(Path(refreshed["path"]).resolve())
    follow = {k: v for k, v in resources.items()}
    follow["flywheel"] = resources_for(home, ingest={"source": ""})["flywheel"]
    mats = materialized(dg.materialize(assets_named("demonstrations"), partition_key=DOMAIN, instance=instance,
                                       resources=follow))
    demos = mats["demonstrations"]
    assert Path(demos["dataset_root"]).resolve() == Path(refreshed["path"]).resolve()
    assert demos["episodes"] == refreshed["real_episodes"] + refreshed["synthetic_episodes"]
    assert demos["key"] != latest(instance, "refreshed_dataset")["inputs"]["demonstrations"]

    # This domain has no registered source and no inbox folder: without the refreshed version there is nothing.
    back = dg.materialize(assets_named("demonstrations"), partition_key=DOMAIN, instance=instance,
                          resources=resources_for(home, ingest={"source": "", "follow_refreshed": False}),
                          raise_on_error=False)
    assert not back.success
    assert failure_of(back).startswith(f"domain {DOMAIN!r} has no demonstrations: set ingest.source")


def test_with_policy_evidence_policy_evaluation_makes_the_build_on_decision(flywheel_run):
    """gates.refresh.evidence: policy moves the build-on decision from refreshed_dataset to policy_evaluation,
    which falls back to the IDM proxy where no policy was evaluated (here: policy.evaluate off) and says so."""
    instance, _, home, _ = flywheel_run
    res = resources(home, gates={"refresh": {"evidence": "policy"}}, policy={"evaluate": "off"})
    result = dg.materialize(assets_named("refreshed_dataset", "policy_evaluation"), partition_key=DOMAIN,
                            instance=instance, resources=res, selection=assets_named("refreshed_dataset",
                                                                                     "policy_evaluation"))
    assert result.success
    close(home, instance, result)
    mats = materialized(result)
    assert mats["refreshed_dataset"]["build_on_decided_by"] == "policy_evaluation"
    assert "next_iteration_ingests_it" not in mats["refreshed_dataset"]
    assert mats["policy_evaluation"]["not_evaluated"] == "policy.evaluate is off"
    assert mats["policy_evaluation"]["next_iteration_ingests_it"] is True
    checks = {(e.asset_key.path[-1], e.check_name): e for e in result.get_asset_check_evaluations()}
    assert checks["refreshed_dataset", "build_on"].description.startswith("not decided in this run")
    build = checks["policy_evaluation", "build_on_policy"]
    assert build.passed and "[evidence: IDM proxy (no policy evaluated: policy.evaluate is off)]" in build.description
    assert not checks["policy_evaluation", "policy_verdict"].passed
    _, children = step_runs_of_dagster_run(home, result.run_id, kind="experiment")
    tags = children["policy_evaluation"].data.tags
    assert tags["flywheel.decision.build_on"] == "passed" and tags["flywheel.decision.policy_verdict"] == "failed"


def test_rematerializing_synthetic_videos_reuses_upstream(flywheel_run, small_pusht):
    instance, _, home, resources = flywheel_run
    adapter_before = latest(instance, "adapter")
    clips_before = latest(instance, "training_clips")
    experiment = resources_for(home, small_pusht, generate={"seeds": [0, 1], "max_videos": 3})
    result = dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                            resources=experiment)
    assert result.success
    mats = materialized(result)
    assert list(mats) == ["synthetic_videos"]  # nothing upstream ran again
    assert mats["synthetic_videos"]["videos"] == 3
    assert mats["synthetic_videos"]["inputs"] == {"training_clips": clips_before["key"],
                                                  "generating_adapter": adapter_before["key"]}
    # the same experiment again: the artifact is reused, not regenerated
    again = materialized(dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                                        resources=experiment))
    assert again["synthetic_videos"]["reused"] is True
    assert again["synthetic_videos"]["key"] == mats["synthetic_videos"]["key"]
    # an experiment is a Dagster run of its own: its own MLflow parent run (unnumbered) with one child run
    close(home, instance, result)
    parent, children = step_runs_of_dagster_run(home, result.run_id, kind="experiment")
    assert list(children) == ["synthetic_videos"] and "flywheel.iteration" not in parent.data.tags
    assert parent.info.status == "FINISHED"
    assert mats["synthetic_videos"]["mlflow_run_id"] == children["synthetic_videos"].info.run_id


def test_synthetic_videos_adapter_choice_base_or_registry_version(flywheel_run):
    instance, _, home, _ = flywheel_run
    version = latest(instance, "adapter")["registered_version"]
    for choice, label in (("base", "base"), (version, f"v{version}")):
        chosen = resources_for(home, generate={"seeds": [0], "max_videos": 1, "adapter": choice})
        mats = materialized(dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                                           resources=chosen))
        assert mats["synthetic_videos"]["generated_with"] == label
        assert (mats["synthetic_videos"].get("mlflow_model_version") == version) is (choice != "base")
    missing = dg.materialize(assets_named("synthetic_videos"), partition_key=DOMAIN, instance=instance,
                             resources=resources_for(home, generate={"seeds": [0], "max_videos": 1, "adapter": "999"}),
                             raise_on_error=False)
    assert not missing.success
    assert "has no version '999'" in failure_of(missing)


def test_invalid_config_fails_before_any_gpu_work_and_is_not_retried(flywheel_run):
    instance, _, home, _ = flywheel_run
    result = dg.materialize(assets_named("adapter"), partition_key=DOMAIN, instance=instance,
                            resources=resources_for(home, train={"rank": 0}), raise_on_error=False)
    assert not result.success
    assert "the Launchpad (resources.flywheel.config.run): train.rank: Input should be greater than 0" in \
        failure_of(result)
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert not any("workload" in m for m in logs)  # nothing was launched


def test_train_workload_through_pipes_streams_logs_and_metadata(flywheel_run, monkeypatch, tmp_path_factory):
    instance, _, home, _ = flywheel_run
    # the workload is a fresh Python importing torch: let it cache bytecode (the suite may disable writing it)
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "flywheel-test-pycache"))
    pipes = resources_for(home, gpu="subprocess", gpus=1, train={"steps": 3, "checkpoint_every": 2})
    result = dg.materialize(assets_named("adapter"), partition_key=DOMAIN, instance=instance, resources=pipes)
    assert result.success
    meta = materialized(result)["adapter"]
    assert meta["steps"] == 3 and math.isfinite(meta["final_loss"]) and meta["reused"] is False
    assert (Path(meta["path"]) / "adapter_card.json").is_file()
    assert meta["preview_image"].startswith("![loss](data:image/png;base64,")
    logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert any("adapter workload started" in m for m in logs), logs
    assert any("stage=train" in m and "loss=" in m for m in logs)  # progress streamed from the subprocess
    assert any("running adapter on GPU 0" in m for m in logs)


def test_a_failing_blocking_gate_stops_downstream_assets(small_pusht, tmp_path):
    strict = resources_for(tmp_path / "home", small_pusht, gates={"demonstrations": {"min_episodes": 1000}})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("domain", [DOMAIN])
        selected = ["demonstrations", "training_clips", "adapter"]
        result = dg.materialize(assets_named(*selected), partition_key=DOMAIN, instance=instance, resources=strict,
                                raise_on_error=False)
        assert not result.success
        assert list(materialized(result)) == ["demonstrations"]  # recorded, but nothing downstream ran
        (check,) = result.get_asset_check_evaluations()
        assert check.check_name == "enough_episodes" and check.passed is False
        assert "episodes 4 (needs >= 1000)" in check.description
        step_events = {e.step_key: e.event_type_value for e in result.all_events if e.step_key}
        assert "training_clips" not in step_events or step_events["training_clips"] != "STEP_SUCCESS"


def test_workload_runs_standalone_without_dagster(flywheel_run):
    """The same entrypoint by hand: the adapter of the graph run is found in the store, not retrained."""
    instance, result, home, resources = flywheel_run
    graph = materialized(result)
    clips = {k: v for k, v in graph["training_clips"].items() if k != "preview_image"}
    args = {"inputs": {"training_clips": clips},
            "config": resources["flywheel"].flywheel_config(DOMAIN).model_dump(mode="json")}
    proc = subprocess.run([sys.executable, "-m", "flywheel.workloads.stage", "--stage", "adapter", "--home", str(home),
                           "--config-json", json.dumps(args, default=str)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["reused"] is True and out["key"] == graph["adapter"]["key"] and out["path"] == graph["adapter"]["path"]
