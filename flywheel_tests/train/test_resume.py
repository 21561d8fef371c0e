"""Kill-and-resume: a training process SIGKILLed after a checkpoint, then resumed, ends with the same adapter,
tensor for tensor, as a run that was never interrupted.

Run as a module, this file is the training process the test kills:
    python -m flywheel_tests.train.test_resume CACHE_DIR WORK_DIR CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flywheel.train import TrainConfig, train_adapter
from flywheel.train.adapter_io import ADAPTER_WEIGHTS
from flywheel.train.checkpoint import list_checkpoints, load_checkpoint
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = TrainConfig(method="lora", rank=4, alpha=8, steps=12, batch_size=2, learning_rate=1e-2, warmup_steps=2,
                     checkpoint_every=3, keep_checkpoints=2, seed=3)
STEP_DELAY_S = 0.3  # the child sleeps between steps so the kill lands mid-run, not after the end


def test_killed_run_resumes_to_a_bit_identical_adapter(tiny_pipe, tiny_latent_cache, tmp_path):
    torch.set_num_threads(1)  # the child uses one thread too: same kernels, same rounding
    work = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-m", "flywheel_tests.train.test_resume", str(tiny_latent_cache.root), str(work),
         CONFIG.model_dump_json()],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 240
        while not (work.exists() and list_checkpoints(work)):
            if child.poll() is not None:
                raise AssertionError(f"training process exited ({child.returncode}) before its first checkpoint:\n"
                                     + child.stdout.read().decode()[-3000:])
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (work / "adapter").exists(), "the child finished before the kill; the test proved nothing"

    step, path = list_checkpoints(work)[-1]
    weights, state, saved_config = load_checkpoint(path)
    assert 0 < step < CONFIG.steps and state["step"] == step and len(state["losses"]) == step
    assert {"optimizer", "lr_scheduler", "rng"} <= state.keys()
    assert {"torch", "noise_generator", "sampler"} <= state["rng"].keys() and saved_config == CONFIG.on_device("cpu").model_dump(mode="json")

    resumed = train_adapter(tiny_latent_cache, tiny_pipe, CONFIG, work, progress=lambda _: None)
    straight = train_adapter(tiny_latent_cache, tiny_pipe, CONFIG, tmp_path / "straight", progress=lambda _: None)
    assert resumed.resumed_from_step >= step and straight.resumed_from_step == 0

    a = load_file(resumed.adapter_dir / ADAPTER_WEIGHTS)
    b = load_file(straight.adapter_dir / ADAPTER_WEIGHTS)
    assert a.keys() == b.keys() and len(a) > 0
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed adapter differs from the uninterrupted one in {different[:5]}"
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora.up" in k), "adapter never trained (B still zero)"
    assert resumed.losses == straight.losses
    assert json.loads((resumed.adapter_dir / "adapter_card.json").read_text()) == straight.card


def _train_in_this_process(cache_dir: str, work_dir: str, config_json: str) -> None:
    from flywheel.data.latent_cache import LatentCache
    from flywheel.model.presets import load_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline("tiny")
    train_adapter(LatentCache(cache_dir), pipe, TrainConfig.model_validate_json(config_json), Path(work_dir),
                  progress=lambda _: time.sleep(STEP_DELAY_S))


if __name__ == "__main__":
    _train_in_this_process(*sys.argv[1:4])
