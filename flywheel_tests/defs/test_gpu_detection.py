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
