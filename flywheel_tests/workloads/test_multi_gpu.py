"""Train / generate steps on several devices: the Pipes launcher starts the workload under torchrun (here two
gloo processes on CPU: `gpus=0, gpus_per_step=2`), rank 0 alone reports to Dagster, the other rank runs the
same stage silently; a workload's own exit code survives torchrun; the same command works by hand; a step's
devices are locked all at once or not at all."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from flywheel.config import FlywheelConfig
from flywheel.defs.pipes import GpuLauncher, workload_command
from flywheel.defs.resources import FlywheelResource
from flywheel.pipeline import STAGES
from flywheel.stages import StageResult
from flywheel.train.config import TrainConfig
from flywheel.workloads.gpu import EXIT_CONFIG
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)

pytestmark = pytest.mark.multiprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN = TrainConfig(rank=4, alpha=4, steps=3, batch_size=2, checkpoint_every=2, learning_rate=1e-2, warmup_steps=0)


class StepConfig(dg.Config):
    batch_size: int = 2


def config_for(batch_size: int = 2) -> FlywheelConfig:
    """The tiny preset on the CPU (these tests are sized for it, not the default tiny-pusht)."""
    return FlywheelConfig(model={"preset": "tiny", "device": "cpu"},
                          train=TRAIN.model_copy(update={"batch_size": batch_size}))


def clips_input(cache_root: Path) -> dict[str, StageResult]:
    return {"training_clips": StageResult(stage="training_clips", key="tiny-g1", path=cache_root,
                                          metadata={"latent_cache": str(cache_root)})}


def _launch(cache_root: Path):
    @dg.asset
    def trained(context: dg.AssetExecutionContext, config: StepConfig, flywheel: FlywheelResource, gpu: GpuLauncher):
        result = gpu.run_stage(context, STAGES["adapter"], clips_input(cache_root), config_for(config.batch_size),
                               flywheel)
        return dg.MaterializeResult(metadata={"path": str(result.path), "key": result.key,
                                              "steps": result.metadata["steps"]})

    return trained


def test_a_train_step_on_two_processes_through_pipes_and_by_hand(tiny_latent_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    home = tmp_path / "home"
    resources = {"flywheel": FlywheelResource(home=str(home), gpus=0, gpus_per_step=2),
                 "gpu": GpuLauncher(backend="subprocess")}
    trained = _launch(tiny_latent_cache.root)
    with dg.instance_for_test() as instance:
        result = dg.materialize([trained], instance=instance, resources=resources)
        assert result.success
        (event,) = result.get_asset_materialization_events()  # one report, from rank 0
        meta = {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
        logs = [r.user_message for r in instance.all_logs(result.run_id)]
    assert meta["steps"] == 3 and (Path(meta["path"]) / "adapter_card.json").is_file()
    assert any("running adapter on CPU: torchrun, 2 processes" in m for m in logs), logs
    assert any("adapter workload started" in m and "rank 0 of 2 processes" in m for m in logs), logs
    assert sum("adapter workload started" in m for m in logs) == 1, "only rank 0 may talk to Pipes"
    assert any("stage=train" in m and "loss=" in m for m in logs)  # progress streamed from rank 0

    # By hand, the same command the launcher ran: the adapter is found in the store; one JSON on stdout (rank 0).
    args = {"inputs": {k: v.as_metadata() for k, v in clips_input(tiny_latent_cache.root).items()},
            "config": config_for().model_dump(mode="json")}
    command = workload_command(sys.executable, "adapter", str(home), args, processes=2)
    assert command[1:7] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")}
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["reused"] is True and out["key"] == meta["key"] and out["path"] == meta["path"]


def test_a_config_error_on_two_processes_keeps_its_exit_code_and_is_not_retried(tiny_latent_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resources = {"flywheel": FlywheelResource(home=str(tmp_path / "home"), gpus=0, gpus_per_step=2),
                 "gpu": GpuLauncher(backend="subprocess")}
    with dg.instance_for_test() as instance:
        result = dg.materialize([_launch(tiny_latent_cache.root)], instance=instance, resources=resources,
                                run_config={"ops": {"trained": {"config": {"batch_size": 3}}}}, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.event_specific_data.error.message
    assert f"exited with code {EXIT_CONFIG}" in error, error  # rank 0's code, not torchrun's 1
    assert "train.batch_size (3) must be divisible by the number of processes (2" in error


def test_generate_workload_by_hand_on_two_processes(pusht_root, tmp_path):
    """`torchrun -m flywheel.workloads.stage --stage synthetic_videos`: the videos split over two ranks, one artifact
    written by rank 0."""
    from flywheel.data.clips import ClipConfig, prepare_clips
    from flywheel.data.ingest import IngestConfig, ingest
    from flywheel.model.presets import get_preset
    from flywheel.store import ArtifactStore

    store = ArtifactStore(tmp_path / "home")
    manifest = ingest(IngestConfig(source=str(pusht_root)), store, progress=lambda _: None)
    clip_set = prepare_clips(manifest.frame, manifest.key, store, ClipConfig(max_clips_per_episode=1), get_preset("tiny"),
                             progress=lambda _: None)
    config = FlywheelConfig(model={"preset": "tiny", "device": "cpu"},  # 3 videos: ranks get 2 and 1
                            generate={"seeds": [0, 1], "max_videos": 3, "num_inference_steps": 2})
    clips = StageResult(stage="training_clips", key=clip_set.key, path=clip_set.path)
    args = {"inputs": {"training_clips": clips.as_metadata()}, "config": config.model_dump(mode="json")}
    proc = subprocess.run(workload_command(sys.executable, "synthetic_videos", str(store.home), args, processes=2),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DAGSTER_PIPES")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)  # one result, from rank 0
    assert out["videos"] == 3 and out["reused"] is False
    synthetic = Path(out["path"])
    samples = pd.read_parquet(synthetic / "samples.parquet")
    assert len(samples) == 3 and samples["frames_sha256"].nunique() == 3
    assert all((synthetic / v).is_file() for v in samples["video"]) and all((synthetic / f).is_file() for f in samples["first_frame"])
    assert json.loads((synthetic / "generation.json").read_text())["processes"] == 2
    assert [p.name for p in (store.home / "synthetic").iterdir()] == [synthetic.name], "a temp dir was left behind"
    assert "[synthetic_videos] 2/2 event=video" in proc.stderr  # rank 0 reports its own share (2 of the 3 videos)


def test_a_multi_gpu_step_locks_all_its_devices_or_none(tmp_path, monkeypatch):
    from flywheel.defs.gpus import gpu_slot

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with gpu_slot(tmp_path, gpus=4) as one, gpu_slot(tmp_path, gpus=4, count=2) as two:
        assert (one, two) == ("0", "1,2")
        with pytest.raises(TimeoutError, match="no 2 free GPU"):  # only device 3 is free
            with gpu_slot(tmp_path, gpus=4, count=2, timeout_s=0.1):
                pass
        with gpu_slot(tmp_path, gpus=4, timeout_s=0.1) as three:
            assert three == "3", "the failed 2-GPU attempt must not keep device 3 locked"
    with gpu_slot(tmp_path, gpus=4, count=4) as four:
        assert four == "0,1,2,3"
    with pytest.raises(ValueError, match="gpus_per_step"):
        with gpu_slot(tmp_path, gpus=2, count=3):
            pass
