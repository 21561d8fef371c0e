"""Data-parallel training: two gloo processes started by torchrun (the real launcher) train the adapter that
one process trains on the same global batch, and checkpoints resume across process counts (2 -> 1, 1 -> 2).

Run under torchrun, this file is the training program of each rank:
    python -m torch.distributed.run --nproc-per-node 2 --standalone -m flywheel_tests.train.test_distributed CACHE_DIR ROOT
It trains ROOT/two-procs from scratch, ROOT/resumed-on-two from the one-process checkpoint the test put
there, then ROOT/killed, where rank 0 stalls after the step-2 checkpoint so the test can stop the job.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flywheel.train import TrainConfig, train_adapter
from flywheel.train.adapter_io import ADAPTER_WEIGHTS
from flywheel.train.checkpoint import list_checkpoints
from flywheel.train.distributed import World
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)

pytestmark = pytest.mark.multiprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
# Global batch 2 = one clip per rank on two ranks; a constant, high LR so 4 steps move the adapter clearly;
# full activation checkpointing: the gradient all-reduce must work with the recompute-in-backward path.
CONFIG = TrainConfig(method="lora", rank=4, alpha=8, steps=4, batch_size=2, learning_rate=1e-2, warmup_steps=0,
                     f_start=1.0, f_max=1.0, f_min=1.0, checkpoint_every=2, keep_checkpoints=2, seed=3,
                     activation_checkpointing="full")
STALL_S = 120.0  # rank 0 of the `killed` run sleeps this long after step 2: the test stops the job meanwhile


class _StopAfterCheckpoint(Exception):
    pass


def _stop_at_step_2(event: dict) -> None:
    if event["step"] == 2:
        raise _StopAfterCheckpoint


def _weights(result_or_dir) -> dict[str, torch.Tensor]:
    adapter_dir = getattr(result_or_dir, "adapter_dir", result_or_dir)
    return load_file(Path(adapter_dir) / ADAPTER_WEIGHTS)


def _assert_same_adapter(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys() and len(want) > 0, what
    worst = max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)) for k in want)
    # Only the float summation order differs (a batch of 2 split into two batches of 1, an all-reduce): ~4e-6
    # here; a wrong shard of the draws or unsynchronised gradients is off by 1e-2 and more.
    assert worst < 5e-5, f"{what}: adapter differs from the one-process adapter (max relative error {worst:.2e})"


def test_two_processes_train_the_same_adapter_as_one_and_resume_on_any_count(tiny_pipe, tiny_latent_cache, tmp_path):
    torch.set_num_threads(1)
    cache = tiny_latent_cache
    # One process: 2 steps, stopped after the step-2 checkpoint; a copy goes to the two-process job to resume.
    one = tmp_path / "one-proc"
    with pytest.raises(_StopAfterCheckpoint):
        train_adapter(cache, tiny_pipe, CONFIG, one, progress=_stop_at_step_2)
    assert [s for s, _ in list_checkpoints(one)] == [2]
    root = tmp_path / "jobs"
    root.mkdir()
    shutil.copytree(one, root / "resumed-on-two")
    reference = train_adapter(cache, tiny_pipe, CONFIG, one, progress=lambda _: None)  # resumed: = straight (test_resume)
    assert reference.resumed_from_step == 2 and len(reference.losses) == 4
    want = _weights(reference)
    assert any(v.abs().max() > 0 for k, v in want.items() if "lora_B" in k or "lora.up" in k), "adapter never trained"

    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "flywheel_tests.train.test_distributed", str(cache.root), str(root)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((root / "killed").exists() and list_checkpoints(root / "killed")):
            if job.poll() is not None:
                raise AssertionError(f"torchrun exited ({job.returncode}) before the `killed` run's checkpoint:\n"
                                     + job.stdout.read()[-4000:])
            assert time.monotonic() < deadline, "the two-process job wrote no checkpoint in 180 s"
            time.sleep(0.02)
        job.send_signal(signal.SIGTERM)  # a preempted job: torchrun stops both ranks
        log = job.communicate(timeout=60)[0]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()

    # 1. Two processes from scratch = one process; every rank returned the same result.
    for name in ("two-procs", "resumed-on-two"):
        assert (root / name / "adapter" / ADAPTER_WEIGHTS).is_file(), f"{name} did not finish:\n{log[-4000:]}"
    rank_results = [json.loads((root / f"two-procs-rank{r}.json").read_text()) for r in (0, 1)]
    assert rank_results[0] == rank_results[1], "ranks returned different TrainResults"
    assert rank_results[0]["losses"] == pytest.approx(reference.losses, rel=1e-5)
    _assert_same_adapter(_weights(root / "two-procs" / "adapter"), want, "2 processes, global batch 2")
    card = json.loads((root / "two-procs" / "adapter" / "adapter_card.json").read_text())
    assert card["config"] == reference.card["config"] and card["final_loss"] == pytest.approx(reference.card["final_loss"], rel=1e-5)
    assert not list((root / "two-procs").glob("checkpoint-*")), "rank 0 removes the checkpoints at the end"

    # 2. A one-process checkpoint resumed on two processes.
    _assert_same_adapter(_weights(root / "resumed-on-two" / "adapter"), want, "1 process -> 2 processes")

    # 3. A two-process checkpoint (rank 0 wrote it) resumed on one process.
    assert [s for s, _ in list_checkpoints(root / "killed")] == [2]
    assert not (root / "killed" / "adapter").exists(), "the job finished before it was stopped; nothing was resumed"
    resumed = train_adapter(cache, tiny_pipe, CONFIG, root / "killed", progress=lambda _: None)
    assert resumed.resumed_from_step == 2
    _assert_same_adapter(_weights(resumed), want, "2 processes -> 1 process")
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-5)


def test_the_global_batch_must_split_evenly_over_the_processes():
    world = World(rank=1, world_size=4)
    assert world.shard(8) == slice(2, 4)
    with pytest.raises(ValueError, match=r"train.batch_size \(6\) must be divisible by the number of processes \(4"):
        world.shard(6)


def test_the_multi_gpu_benchmark_reports_weak_scaling():
    """benchmarks/multi_gpu.py's arithmetic (its CPU run, `--dry-run`, takes ~30 s: run by hand)."""
    from benchmarks.multi_gpu import markdown_table, parse_args, summarize

    args = parse_args(["--dry-run"])
    assert (args.device, args.preset, args.gpus, args.no_compile) == ("cpu", "tiny", 2, True)
    args = parse_args(["--device", "cpu", "--gpus", "8", "--gen-steps", "12"])
    train = lambda s: {"seconds": s, "peak_gib": 20.0, "times": [s], "finite": True}  # noqa: E731
    gen = lambda s, n: {"seconds": s, "videos": n, "steps": 12, "peak_gib": 30.0, "videos_per_hour": n / s * 3600}  # noqa: E731
    one = {"processes": 1, "train": [train(2.0)], "generate": [gen(100.0, 2)]}
    many = {"processes": 8, "train": [train(2.1)] * 7 + [train(2.2)], "generate": [gen(110.0, 16)] * 8}
    workloads = summarize(one, many, args)
    t = workloads["train_lora[x8]"]
    assert t["scaling_efficiency"] == round(2.0 / 2.2, 3)  # the slowest rank sets the step time
    assert t["speedup"] == round(8 * 2.0 / 2.2, 3) and t["baseline_s"] == 2.0 and t["ours_s"] == 2.2
    g = workloads["generate_i2w[x8]"]
    assert g["speedup"] == round(50.0 / (110.0 / 16), 3)  # videos/hour on 8 GPUs over videos/hour on 1
    assert g["scaling_efficiency"] == round(50.0 / (110.0 / 16) / 8, 3) and "shortened to 12 steps" in g["notes"]
    assert "| train_lora[x8] | 2.0 | 2.2 | 7.273 | 0.909 |" in markdown_table(workloads)


def _train_on_every_rank(cache_dir: str, root: str) -> None:
    """The program of each torchrun rank (see the module docstring)."""
    from flywheel.data.latent_cache import LatentCache
    from flywheel.model.presets import load_pipeline
    from flywheel.train.distributed import init_world

    torch.set_num_threads(1)
    world = init_world("cpu")
    pipe = load_pipeline("tiny")
    cache, root = LatentCache(cache_dir), Path(root)
    result = train_adapter(cache, pipe, CONFIG, root / "two-procs", progress=lambda _: None)
    (root / f"two-procs-rank{world.rank}.json").write_text(json.dumps({"losses": result.losses, "card": result.card,
                                                                       "adapter_dir": str(result.adapter_dir)}))
    train_adapter(cache, pipe, CONFIG, root / "resumed-on-two", progress=lambda _: None)
    train_adapter(cache, pipe, CONFIG, root / "killed", progress=lambda e: e["step"] >= 2 and time.sleep(STALL_S))


if __name__ == "__main__":
    _train_on_every_rank(*sys.argv[1:3])
