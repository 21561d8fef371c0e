"""Generation fanned out over two gloo processes started by torchrun: the same videos (frames_sha256) and the
same samples.parquet rows as one process, gathered into one directory that rank 0 writes.

Run under torchrun, this file is the program of each rank:
    python -m torch.distributed.run --nproc-per-node 2 --standalone -m flywheel_tests.generate.test_distributed_generation ROOT
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flywheel.data.video import probe, read_frames
from flywheel.generate.config import GenerateConfig
from flywheel.generate.world import GenerationRequest, generate_videos, unload_adapters

pytestmark = pytest.mark.multiprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Pick up the yellow bottle on the table."
CONFIG = GenerateConfig(num_inference_steps=2)
REAL_VIDEO = "g1_pick_bottle/videos/observation.images.cam_high/chunk-000/file-000.mp4"
# Compared besides frames_sha256: everything a row says about a video except how long it took.
SAME_COLUMNS = ["request_id", "video", "adapter", "seed", "prompt", "num_frames", "steps", "frames_sha256"]


def make_requests(root: Path) -> list[GenerationRequest]:
    """Two base and two adapter videos: round-robin gives each rank one of each (both adapter groups per rank)."""
    frame = root / "first_frame.png"
    return [GenerationRequest(request_id=f"r{i}-{adapter or 'base'}-s{seed}", first_frame=frame, prompt=PROMPT, seed=seed,
                              adapter=adapter, source_episode_id="ep0", source_clip_id="ep0-f00000")
            for i, (adapter, seed) in enumerate([(None, 0), (None, 1), ("mine", 0), ("mine", 5)])]


def _make_adapter(pipe, out_dir: Path) -> Path:
    """A LoRA with non-zero B (it changes the videos), saved the diffusers way."""
    from flywheel.train.adapter_io import remove_adapter, save_adapter
    from flywheel.train.config import TrainConfig
    from flywheel.train.lora import add_training_adapter
    from flywheel_tests.adapter_card import make_card

    params = add_training_adapter(pipe.transformer, TrainConfig(rank=4, alpha=4))
    try:
        with torch.no_grad():
            generator = torch.Generator().manual_seed(11)
            for p in params:
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
        save_adapter(pipe.transformer, out_dir, make_card("lora", 4, 4))
    finally:
        remove_adapter(pipe)
    return out_dir


def test_two_processes_generate_the_videos_of_one(tiny_pipe, robot_datasets, tmp_path):
    torch.set_num_threads(1)
    Image.fromarray(read_frames(robot_datasets / REAL_VIDEO, 0.0, 0.05)[0]).save(tmp_path / "first_frame.png")
    adapter = _make_adapter(tiny_pipe, tmp_path / "adapter")
    unload_adapters(tiny_pipe)
    try:
        one = generate_videos(tiny_pipe, make_requests(tmp_path), tmp_path / "one-proc", CONFIG,
                              adapters={"mine": adapter}, progress=lambda _: None)
    finally:
        unload_adapters(tiny_pipe)
    assert one.frame["frames_sha256"].nunique() == 4, "four different videos expected (seeds and adapter differ)"

    job = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         "-m", "flywheel_tests.generate.test_distributed_generation", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    out = tmp_path / "two-procs"
    on_disk = pd.read_parquet(out / "samples.parquet")
    pd.testing.assert_frame_equal(on_disk[SAME_COLUMNS], one.frame[SAME_COLUMNS])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1], "every rank returns the same result"
    assert ranks[0]["frames_sha256"] == list(one.frame["frames_sha256"]) and ranks[0]["out_dir"] == str(out)
    assert ranks[0]["second_call"] == "FileExistsError", "an existing output is refused on every rank"
    assert ranks[1]["second_call"] == "FileExistsError"
    for video in on_disk["video"]:
        info = probe(out / video)
        assert info["num_frames"] == CONFIG.resolved(tiny_pipe.flywheel_preset).num_frames
    generation = json.loads((out / "generation.json").read_text())
    assert generation["processes"] == 2 and generation["videos"] == 4 and generation["unique_prompts"] == 1
    with Image.open(out / "contact_sheet.png") as sheet, Image.open(one.contact_sheet) as single:
        assert sheet.size == single.size  # all four videos, in request order, gathered from both ranks
        np.testing.assert_array_equal(np.asarray(sheet), np.asarray(single))
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "generation.json", "samples.parquet", "videos"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name], "a temp dir was left behind"


def _generate_on_every_rank(root: str) -> None:
    """The program of each torchrun rank: rank 0's out_dir is the output, the others pass None."""
    from flywheel.model.presets import load_pipeline
    from flywheel.train.distributed import init_world

    torch.set_num_threads(1)
    world = init_world("cpu")
    root = Path(root)
    pipe = load_pipeline("tiny")
    out = root / "two-procs"
    result = generate_videos(pipe, make_requests(root), out if world.is_main else None, CONFIG,
                             adapters={"mine": root / "adapter"}, progress=lambda _: None)
    try:
        generate_videos(pipe, make_requests(root), out, CONFIG, adapters={"mine": root / "adapter"})
        second = "no error"
    except FileExistsError as e:
        second = type(e).__name__
    (root / f"rank{world.rank}.json").write_text(json.dumps({
        "frames_sha256": list(result.frame["frames_sha256"]), "out_dir": str(result.out_dir), "second_call": second}))


if __name__ == "__main__":
    _generate_on_every_rank(sys.argv[1])
