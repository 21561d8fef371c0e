"""Test helpers for adapter training: a small latent cache of real robot frames, encoded by the tiny pipe.

The cache is built once per session (both test modules import the fixture; the second finds the
directory already there).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

PROMPT = "Pick up the yellow bottle on the table."
NUM_FRAMES = 17
SIZE = 64
# (video file, start second): two windows from each of the two mp4 files of g1_pick_bottle.
WINDOWS = [("file-000.mp4", 1.0), ("file-000.mp4", 9.0), ("file-001.mp4", 2.0), ("file-001.mp4", 12.0)]


def encode_window(pipe, video: Path, start_s: float) -> torch.Tensor:
    """17 real frames -> 64x64 -> Wan VAE mean -> Cosmos 2.5 normalised latent [C, T', H', W']."""
    from flywheel.data.video import read_frames

    frames = read_frames(video, start_s, start_s + (NUM_FRAMES + 1) / 30.0)[:NUM_FRAMES]
    assert len(frames) == NUM_FRAMES, f"{video}@{start_s}s: decoded only {len(frames)} frames"
    images = [Image.fromarray(f).resize((SIZE, SIZE), Image.BILINEAR) for f in frames]
    x = pipe.video_processor.preprocess_video(images, SIZE, SIZE).to(pipe.vae.dtype)  # [1, 3, T, H, W] in [-1, 1]
    with torch.no_grad():
        mu = pipe.vae.encode(x).latent_dist.mean
    return ((mu.float() - pipe.latents_mean) * pipe.latents_std)[0]


def build_tiny_latent_cache(pipe, robot_datasets: Path, root: Path) -> Path:
    """Write a latent cache of WINDOWS at `root` (temp dir + rename); reuse it when already there."""
    from flywheel.data.latent_cache import LatentCacheWriter

    if (root / "cache.json").is_file():
        return root
    video_dir = robot_datasets / "g1_pick_bottle" / "videos" / "observation.images.cam_high" / "chunk-000"
    tmp = root.with_name(f".{root.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        writer = LatentCacheWriter(tmp)
        with torch.no_grad():
            writer.add_prompt(PROMPT, pipe._get_prompt_embeds(PROMPT, max_sequence_length=64)[0])
        for i, (name, start_s) in enumerate(WINDOWS):
            writer.add_clip(f"g1-{i:02d}", "train", PROMPT, encode_window(pipe, video_dir / name, start_s))
        preset = pipe.flywheel_preset
        writer.finish(dict(model_id=preset.model_id, revision=preset.revision, height=SIZE, width=SIZE,
                           num_frames=NUM_FRAMES, fps=30, clip_set="test-g1-4-windows"))
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


@pytest.fixture(scope="session")
def tiny_latent_cache(tiny_pipe, robot_datasets, tmp_path_factory):
    """A LatentCache of 4 real g1_pick_bottle windows (64x64, 17 frames) encoded by the tiny pipe."""
    from flywheel.data.latent_cache import LatentCache

    return LatentCache(build_tiny_latent_cache(tiny_pipe, robot_datasets, tmp_path_factory.getbasetemp() / "train_latent_cache"))
