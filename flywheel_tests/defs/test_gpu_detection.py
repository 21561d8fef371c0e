"""How the launcher counts GPUs without initialising CUDA: CUDA_VISIBLE_DEVICES, /dev/nvidiaN, nvidia-smi -L."""

import os
from pathlib import Path

import pytest

from flywheel.defs.resources import detected_gpus


def test_cuda_visible_devices_decides_when_set(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert detected_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detected_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert detected_gpus() == 0


def test_a_container_without_dev_nvidia_counts_what_nvidia_smi_lists(monkeypatch, tmp_path):
    """The device machines expose the GPU without /dev/nvidia0: the launcher must still see it (it did not, and
    a 2B iteration ran its VAE on the CPU)."""
    if list(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("a GPU host: /dev/nvidiaN decides there")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)'\n")
    smi.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detected_gpus() == 2
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver'\nexit 9\n")
    assert detected_gpus() == 0


def test_a_launched_run_places_gpu_steps_on_the_machines_gpus(monkeypatch, tmp_path):
    """A run config that names the `flywheel` resource (every CLI and Launchpad run) rebuilds it from the fields'
    defaults: the GPU count must still be this machine's. It was not: FLYWHEEL_GPUS=1 was dropped, every GPU
    stage ran with CUDA_VISIBLE_DEVICES='' and a 2B iteration encoded its latents on the CPU of a GPU host.
    Here (no CUDA) the workload still computes on the CPU; what is checked is where Dagster placed it."""
    import dagster as dg

    from flywheel.cli import main
    from flywheel.defs.instance import flywheel_instance

    monkeypatch.setenv("FLYWHEEL_GPUS", "1")
    monkeypatch.setenv("FLYWHEEL_GPU_BACKEND", "subprocess")
    home = tmp_path / "home"
    main(["clips", "--home", str(home), "--set", "model.preset=tiny", "--set", "gates.fit.enabled=false",
          "--set", "clips.max_clips_per_episode=1"])
    instance = flywheel_instance(home)
    try:
        (run,) = instance.get_runs()
        messages = [e.user_message for e in instance.all_logs(run.run_id) if e.step_key == "training_clips"]
    finally:
        instance.dispose()
    assert any("running training_clips on GPU 0" in m for m in messages), messages
    assert run.status == dg.DagsterRunStatus.SUCCESS
