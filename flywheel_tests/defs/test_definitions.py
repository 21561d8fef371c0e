"""The definitions load and say what the pipeline declares: names, groups, partitions, pools, checks, config."""

import subprocess
import sys
import threading
import time

import dagster as dg
import pytest
import yaml

from flywheel.config import FlywheelConfig
from flywheel.defs import defs
from flywheel.errors import ConfigError
from flywheel.pipeline import STAGE_LIST, STAGES
from flywheel.workloads.gpu import EXIT_CONFIG, EXIT_ERROR, EXIT_TRANSIENT_GPU, exit_code_for

STAGE_ASSETS = [s.asset for s in STAGE_LIST]
GROUPS = {"demonstrations": "ingest", "training_clips": "clips", "adapter": "train", "adapter_evaluation": "evaluate",
          "synthetic_videos": "generate", "pseudo_actions": "label", "curated_trajectories": "curate",
          "refreshed_dataset": "refresh", "policy_evaluation": "policy"}
# every stage that loads the world model (curation: its VAE, to calibrate) holds a GPU slot
GPU_ASSETS = {"training_clips", "adapter", "adapter_evaluation", "synthetic_videos", "curated_trajectories",
              "policy_evaluation"}


def test_definitions_load_with_the_fixed_graph():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    nodes = {key.path[-1]: graph.get(key) for key in graph.get_all_asset_keys()}
    assert set(nodes) == set(STAGE_ASSETS)
    for name, node in nodes.items():
        assert node.group_name == GROUPS[name]
        assert node.partitions_def.name == "domain"
    parents = {name: {p.path[-1] for p in node.parent_keys} for name, node in nodes.items()}
    assert parents["training_clips"] == {"demonstrations"}
    assert parents["adapter"] == {"training_clips"}
    assert "adapter_evaluation" in parents["synthetic_videos"]  # the evaluation gate sits before generation
    assert "synthetic_videos" in parents["pseudo_actions"]
    assert "pseudo_actions" in parents["curated_trajectories"]
    assert "curated_trajectories" in parents["refreshed_dataset"]
    assert parents["policy_evaluation"] == {"refreshed_dataset"}  # the closed-loop comparison of the refreshed version


def test_gpu_steps_queue_on_the_gpu_pool_and_retry():
    for assets_def in defs.assets:
        name = assets_def.key.path[-1]
        node = assets_def.node_def
        if name in GPU_ASSETS:
            assert node.pool == "gpu", name
            assert node.retry_policy is not None and node.retry_policy.max_retries >= 1, name
        else:
            assert node.pool is None, name


def test_decisions_are_checks_declared_once_in_the_pipeline():
    specs = {spec.key.name: spec for a in defs.assets for spec in a.check_specs}
    assert set(specs) == {"enough_episodes", "model_fits_the_data", "loss_is_finite", "adapter_gate",
                          "pass_rate_within_bounds", "loads_with_lerobot", "build_on", "policy_verdict",
                          "build_on_policy"}
    # the adapter gate and the build-on decision choose what the wheel uses next (the champion, the version to
    # ingest); they do not stop the run: a refused candidate leaves the champion generating
    assert {name for name, spec in specs.items() if not spec.blocking} == {"adapter_gate", "build_on", "policy_verdict",
                                                                           "build_on_policy"}
    for stage in STAGE_LIST:  # the asset is found from its stage, and its stage from the table: two hops
        assert {c.name for c in stage.checks} == {s.key.name for s in specs.values() if s.asset_key.path[-1] == stage.asset}
        assert STAGES[stage.asset] is stage


def test_job_schedule_sensor():
    job = defs.resolve_job_def("flywheel_iteration")
    assert job.partitions_def.name == "domain"
    assert set(job.asset_layer.executable_asset_keys) >= {dg.AssetKey(a) for a in STAGE_ASSETS}
    schedule = defs.resolve_schedule_def("flywheel_iteration_schedule")
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    sensor = defs.resolve_sensor_def("inbox_sensor")
    assert sensor.job_name == "flywheel_iteration"


def test_launchpad_config_is_the_run_config_with_its_defaults():
    from flywheel.defs.resources import RunSettings

    settings = RunSettings()
    assert settings.train.steps == FlywheelConfig().train.steps and settings.model.preset == "tiny-pusht"
    assert settings.to_core(domain="x") == FlywheelConfig(domain="x")
    assert "home" not in RunSettings.model_fields and "domain" not in RunSettings.model_fields
    # Literal fields are enums in the Launchpad: a typo is rejected before the run starts
    job = defs.resolve_job_def("flywheel_iteration")
    home = {"home": "/tmp/x"}
    dg.validate_run_config(job, {"resources": {"flywheel": {"config": {**home, "run": {"train": {"method": "dora"}}}}}})
    with pytest.raises(dg.DagsterInvalidConfigError, match="method"):
        dg.validate_run_config(job, {"resources": {"flywheel": {"config": {**home, "run": {"train": {"method": "lorra"}}}}}})


@pytest.mark.parametrize("section, values, field", [
    ("train", {"rank": 0}, "train.rank: Input should be greater than 0"),
    ("train", {"cfg_dropout": 1.5}, "train.cfg_dropout"),
    ("train", {"conditional_frames_probs": {"3": 1.0}}, "train.conditional_frames_probs"),
    ("generate", {"num_frames": 18}, "num_frames must be 4k+1"),
])
def test_invalid_values_fail_with_the_field_named(section, values, field):
    from flywheel.defs.resources import RunSettings

    with pytest.raises(ConfigError, match="invalid configuration") as err:
        RunSettings(**{section: values}).to_core()
    assert field in str(err.value) and "the Launchpad" in str(err.value)


def test_instance_yaml_sets_the_gpu_pool_and_turns_telemetry_off(tmp_path, monkeypatch):
    from flywheel.defs.instance import flywheel_instance, use_flywheel_instance

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    folder = use_flywheel_instance(tmp_path / "home", gpus=3)
    assert folder == tmp_path / "home" / "dagster"
    config = yaml.safe_load((folder / "dagster.yaml").read_text())
    assert config["telemetry"] == {"enabled": False}
    assert config["concurrency"]["pools"]["default_limit"] == 3
    import os

    assert os.environ["DAGSTER_HOME"] == str(folder)
    instance = flywheel_instance(tmp_path / "home")
    try:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 3
    finally:
        instance.dispose()
    # an operator's edits (e.g. Postgres storage) survive the next start
    (folder / "dagster.yaml").write_text((folder / "dagster.yaml").read_text() + "# edited\n")
    use_flywheel_instance(tmp_path / "home", gpus=1)
    assert (folder / "dagster.yaml").read_text().endswith("# edited\n")


def test_exit_codes_separate_transient_gpu_errors_from_config_errors():
    import pydantic
    import torch

    from flywheel.train.config import TrainConfig

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert exit_code_for(oom) == EXIT_TRANSIENT_GPU
    assert exit_code_for(RuntimeError("CUDA error: an illegal memory access was encountered")) == EXIT_TRANSIENT_GPU
    with pytest.raises(pydantic.ValidationError) as err:
        TrainConfig(rank=0)
    assert exit_code_for(err.value) == EXIT_CONFIG
    assert exit_code_for(FileNotFoundError("no latent cache")) == EXIT_CONFIG
    assert exit_code_for(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) == EXIT_ERROR


def test_only_transient_gpu_errors_are_retried():
    from flywheel.defs.pipes import only_transient_gpu_errors_retry

    attempts = {"oom": 0, "config": 0}

    def flaky(kind, exc):
        @dg.asset(name=f"flaky_{kind}", retry_policy=dg.RetryPolicy(max_retries=2))
        def _asset():
            attempts[kind] += 1
            with only_transient_gpu_errors_retry():
                if attempts[kind] == 1:
                    raise exc
            return 1
        return _asset

    oom = dg.materialize([flaky("oom", RuntimeError("CUDA error: out of memory"))], raise_on_error=False)
    assert oom.success and attempts["oom"] == 2
    bad = dg.materialize([flaky("config", ValueError("rank must be > 0"))], raise_on_error=False)
    assert not bad.success and attempts["config"] == 1


def test_k8s_pod_spec_requests_gpus_and_mounts_the_home():
    from flywheel.defs.pipes import k8s_pod_spec

    spec = k8s_pod_spec("/mnt/flywheel", gpus_per_pod=2, volume_claim="flywheel-home")
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["volume_mounts"] == [{"name": "flywheel-home", "mount_path": "/mnt/flywheel"}]
    assert spec["volumes"][0]["persistent_volume_claim"]["claim_name"] == "flywheel-home"


def test_each_concurrent_step_gets_its_own_gpu(tmp_path, monkeypatch):
    from flywheel.defs.gpus import gpu_slot

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    held, order = [], []
    release = threading.Event()

    def hold():
        with gpu_slot(tmp_path, gpus=2) as device:
            held.append(device)
            release.wait(10)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.time() + 10
    while len(held) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert sorted(held) == ["0", "1"]

    def third():
        with gpu_slot(tmp_path, gpus=2) as device:
            order.append(device)

    waiter = threading.Thread(target=third)
    waiter.start()
    time.sleep(0.5)
    assert order == []  # both GPUs busy: the third step waits
    release.set()
    waiter.join(10)
    assert order and order[0] in ("0", "1")
    with gpu_slot(tmp_path, gpus=0) as device:
        assert device == ""  # CPU only: no GPU visible


def test_workloads_import_dagster_pipes_only_and_reject_bad_config(tmp_path):
    code = ("import sys, flywheel.workloads.entrypoint, flywheel.workloads.stage, flywheel.pipeline, "
            "flywheel.workloads.gpu, dagster_pipes; assert 'dagster' not in sys.modules, 'dagster imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    proc = subprocess.run([sys.executable, "-m", "flywheel.workloads.stage", "--stage", "adapter", "--home",
                           str(tmp_path), "--config-json", "{not json"], capture_output=True, text=True)
    assert proc.returncode == EXIT_CONFIG
    assert "--config-json: not valid JSON" in proc.stderr and "not retried" in proc.stderr


def test_cancelling_stops_the_whole_workload_process_group():
    """What a cancelled run does to a workload: SIGINT to its process group, then SIGKILL if it lingers."""
    import os

    from flywheel.defs.pipes import stop_process_group

    # a workload that ignores SIGINT and has a child (like a data-loader worker)
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(c.pid, flush=True); "
            "time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(proc.stdout.readline())
    started = time.time()
    stop_process_group(proc, timeout_s=1.0)
    assert proc.returncode == -9 and time.time() - started < 10
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the workload's child process survived")


def test_executor_is_chosen_by_configuration(tmp_path):
    from flywheel.defs import build_definitions
    from flywheel.defs.resources import FlywheelResource

    local = build_definitions(FlywheelResource(home=str(tmp_path)))
    assert local.resolve_job_def("flywheel_iteration").executor_def.name == "multi_or_in_process_executor"
    cluster = build_definitions(FlywheelResource(home=str(tmp_path), executor="k8s"))
    assert cluster.resolve_job_def("flywheel_iteration").executor_def.name == "k8s"


def test_the_gc_job_lists_and_deletes_what_flywheel_gc_would(tmp_path):
    from flywheel.defs.jobs import flywheel_gc
    from flywheel.defs.resources import FlywheelResource
    from flywheel.store import ArtifactStore

    home = tmp_path / "home"
    store = ArtifactStore(home)
    with store.write("synthetic", "old0000000000000000000000", {}) as tmp:  # nothing needs it
        (tmp / "video.mp4").write_bytes(b"x" * 1000)
    resources = {"flywheel": FlywheelResource(home=str(home))}
    with dg.instance_for_test() as instance:
        run = {"ops": {"collect_garbage": {"config": {"min_age_hours": 0}}}}
        dry = flywheel_gc.execute_in_process(run_config=run, instance=instance, resources=resources)
        logs = [r.user_message for r in instance.all_logs(dry.run_id)]
        assert any("synthetic/old0000000000000000000000" in m for m in logs), logs
        assert store.exists("synthetic", "old0000000000000000000000")  # a dry run deletes nothing
        run["ops"]["collect_garbage"]["config"]["dry_run"] = False
        flywheel_gc.execute_in_process(run_config=run, instance=instance, resources=resources)
    assert not store.exists("synthetic", "old0000000000000000000000")
