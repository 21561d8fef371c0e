"""The latent cache: run the frozen VAE and text encoder once per clip / prompt, before training.

    cache = encode_clip_set(clip_set, pipe, store)
    LatentCache(cache.path).load(clip_id)   # what a training step reads

The LoRA step then never touches the VAE or the 7B text encoder. What is computed is exactly what
the diffusers Cosmos 2.5 recipe computes inside its training loop:

    video  = pipe.video_processor.preprocess_video(frames, H, W)            # [B, C, T, H, W] in [-1, 1]
    mu     = vae.encode(video).latent_dist.mean                              # deterministic, VAE dtype
    latent = (mu - pipe.latents_mean) * pipe.latents_std                     # latents_std already holds 1/std
    embeds = pipe._get_prompt_embeds(prompt, max_sequence_length=preset.max_sequence_length)

Artifact `<home>/latents/<key>` in the format of flywheel.data.latent_cache, key = hash of the clip
set key + model id + revision + clip resolution/frames + text length + VAE dtype.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from flywheel.data.latent_cache import LatentCache, LatentCacheWriter
from flywheel.model.presets import ModelPreset
from flywheel.store import ArtifactStore, hash_json

if TYPE_CHECKING:  # the encoders themselves run where PyAV is not installed (the GPU benchmark)
    from flywheel.data.clips import ClipSet

# Bump when what gets cached changes (preprocessing, normalisation), so old caches are not reused.
CACHE_FORMAT = 1


@dataclasses.dataclass
class LatentCacheResult:
    path: Path
    key: str
    summary: dict[str, Any]
    reused: bool = False


def clip_geometry(clip_set: ClipSet) -> dict[str, int]:
    """height, width, num_frames, fps of the clip set (all its clips share them)."""
    frame = clip_set.frame
    geometry = {}
    for name in ("height", "width", "num_frames", "fps"):
        values = sorted(set(frame[name].astype(int).tolist()))
        if len(values) != 1:
            raise ValueError(f"{clip_set.path}: clips differ in {name} ({values}); a clip set must be uniform")
        geometry[name] = values[0]
    return geometry


def pipeline_preset(pipe):
    preset = getattr(pipe, "flywheel_preset", None)
    if preset is None:
        raise ValueError("the pipeline has no flywheel_preset; build it with flywheel.model.presets.load_pipeline "
                         "so the cache key can name the model")
    return preset


def latent_cache_key(clip_set: ClipSet, pipe_or_preset) -> str:
    """The cache's identity: the clip set and the model (a pipeline, or the ModelPreset `resolved_preset`
    gives for it, so a cached clip set is found without building the model). The VAE runs in the preset's
    dtype (encode_clip_set checks it)."""
    preset = pipe_or_preset if isinstance(pipe_or_preset, ModelPreset) else pipeline_preset(pipe_or_preset)
    return hash_json({
        "format": CACHE_FORMAT,
        "clip_set": clip_set.key,
        "model_id": preset.model_id,
        "revision": preset.revision,
        **clip_geometry(clip_set),
        "max_sequence_length": preset.max_sequence_length,
        "vae_dtype": f"torch.{preset.dtype}",
    })[:24]


def load_clip_video(clip_set: ClipSet, row, expected_frames: int) -> list[Image.Image]:
    from flywheel.data.video import VideoError, read_frames

    """A clip's frames as PIL images: the input type the recipe hands to preprocess_video."""
    frames = read_frames(clip_set.path / row["video"])
    if len(frames) != expected_frames:
        raise VideoError(f"{clip_set.path / row['video']}: {len(frames)} frames, expected {expected_frames}; "
                         "the clip set is damaged, delete it and prepare the clips again")
    return [Image.fromarray(f) for f in frames]


def encode_videos(pipe, videos: list[list[Image.Image]], height: int, width: int) -> torch.Tensor:
    """Normalised VAE latents [B, 16, T', H/8, W/8] float32 of a batch of clips."""
    vae = pipe.vae
    device = pipe._execution_device
    video = pipe.video_processor.preprocess_video(videos, height, width).to(device=device, dtype=vae.dtype)
    mu = vae.encode(video).latent_dist.mean
    latents_mean = pipe.latents_mean.to(device=device, dtype=torch.float32)
    inverse_std = pipe.latents_std.to(device=device, dtype=torch.float32)
    return (mu.float() - latents_mean) * inverse_std


# Clips per VAE call in codec_roundtrips, and videos per decode in generate_videos (flywheel.generate.world.
# decode_batch_size): a toy model's VAE is mostly per-call Python overhead (16 clips of 17x64x64 in one call:
# 2.65x faster on a CPU than one by one); a 93x432x768 clip goes alone.
CODEC_BATCH_PIXELS = 1 << 22
CODEC_MAX_BATCH = 16
# Round trips (encode + decode) on a CPU are faster 8 at a time than 16 (the batch's activations then stay in
# cache): 32 toy clips ~1.3x faster (benchmarks/cpu_codec.py, roundtrip_batch). GPUs keep CODEC_MAX_BATCH.
CPU_ROUNDTRIP_MAX_BATCH = 8


def codec_batch_size(frames: int, height: int, width: int, most: int = CODEC_MAX_BATCH) -> int:
    """Clips of frames x height x width per VAE call: as many as CODEC_BATCH_PIXELS allow, 1 to `most`."""
    return max(1, min(most, CODEC_BATCH_PIXELS // (frames * height * width)))


def codec_roundtrip(pipe, frames: np.ndarray) -> np.ndarray:
    """uint8 frames [T, H, W, 3] as the model's VAE renders them: resized to the preset's size, encoded to
    the posterior mean, decoded, resized back. What a generated video of the same scene can at best look
    like, since every generated frame leaves through this decoder."""
    return codec_roundtrips(pipe, [frames])[0]


@torch.no_grad()
def codec_roundtrips(pipe, clips: list[np.ndarray], batch_size: int | None = None) -> list[np.ndarray]:
    """`codec_roundtrip` of many clips, in batches of equally long clips (`batch_size`, default: as many as
    CODEC_BATCH_PIXELS allows at the preset's size, at most CODEC_MAX_BATCH, or CPU_ROUNDTRIP_MAX_BATCH on a
    CPU). Batched and single results can differ by one gray level in a few pixels (float summation order)."""
    preset = pipe.flywheel_preset
    most = CPU_ROUNDTRIP_MAX_BATCH if pipe.vae.device.type == "cpu" else CODEC_MAX_BATCH
    out: list[np.ndarray | None] = [None] * len(clips)
    groups: dict[tuple, list[int]] = {}
    for i, frames in enumerate(clips):
        groups.setdefault(tuple(frames.shape), []).append(i)
    for (count, height, width, _), indices in groups.items():
        padded = count + (-(count - 1)) % 4  # the Wan VAE takes 1 + 4k frames: repeat the last one, trim after
        size = batch_size or codec_batch_size(padded, preset.height, preset.width, most)
        for start in range(0, len(indices), size):
            batch = indices[start:start + size]
            videos = [[Image.fromarray(clips[i][min(t, count - 1)]) for t in range(padded)] for i in batch]
            rendered = _vae_roundtrip(pipe, videos, count)
            for i, frames in zip(batch, rendered):
                if (preset.height, preset.width) != (height, width):
                    frames = np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.BILINEAR))
                                       for f in frames])
                out[i] = frames
    return out


def _vae_roundtrip(pipe, videos: list[list[Image.Image]], count: int) -> np.ndarray:
    """uint8 [B, count, h, w, 3] at the preset's size: preprocess, encode to the posterior mean, decode."""
    preset, vae = pipe.flywheel_preset, pipe.vae
    video = pipe.video_processor.preprocess_video(videos, preset.height, preset.width).to(
        device=pipe._execution_device, dtype=vae.dtype)
    decoded = vae.decode(vae.encode(video).latent_dist.mean).sample[:, :, :count]
    return ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def encode_prompt(pipe, prompt: str, max_sequence_length: int) -> torch.Tensor:
    """Text embeddings [L, D] of one prompt, in the text encoder's dtype."""
    return pipe._get_prompt_embeds(prompt, max_sequence_length=max_sequence_length)[0]


def _reporter(progress: Callable[[dict], None] | None, total: int):
    bar = None if progress else tqdm(total=total, desc="encode", unit="clip", leave=False)

    def report(step: str, done: int, step_total: int) -> None:
        if progress:
            progress({"stage": "encode", "step": step, "done": done, "total": step_total})
        elif step == "latents":
            bar.update(done - bar.n)

    return report, (bar.close if bar else (lambda: None))


def encode_clip_set(
    clip_set: ClipSet,
    pipe,
    store: ArtifactStore,
    progress: Callable[[dict], None] | None = None,
    batch_size: int = 1,
) -> LatentCacheResult:
    """Encode every clip's video and every unique prompt once; returns the latent cache artifact."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if clip_set.frame.empty:
        raise ValueError(f"{clip_set.path}: the clip set has no clips to encode")
    key = latent_cache_key(clip_set, pipe)
    if str(pipe.vae.dtype) != f"torch.{pipeline_preset(pipe).dtype}":
        raise ValueError(f"the pipeline's VAE runs in {pipe.vae.dtype}, its preset says {pipeline_preset(pipe).dtype}; "
                         "build it with flywheel.model.presets.load_pipeline (the cache key assumes the preset's dtype)")
    if store.exists("latents", key):
        path = store.path("latents", key)
        return LatentCacheResult(path, key, LatentCache(path).meta, reused=True)

    preset = pipeline_preset(pipe)
    geometry = clip_geometry(clip_set)
    clips = clip_set.frame
    prompts = list(dict.fromkeys(clips["prompt"]))  # unique, in first-seen order
    summary: dict[str, Any] = {
        "model_id": preset.model_id, "revision": preset.revision, "preset": preset.name, **geometry,
        "clip_set": clip_set.key, "clip_set_path": str(clip_set.path),
        "max_sequence_length": preset.max_sequence_length,
        "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."), "device": str(pipe._execution_device),
        "batch_size": batch_size, "safety": getattr(pipe, "flywheel_safety", None),
    }
    meta: dict[str, Any] = {}
    report, close = _reporter(progress, len(clips))
    try:
        with store.write("latents", key, meta) as tmp, torch.inference_mode():
            writer = LatentCacheWriter(tmp)
            started = time.perf_counter()
            for i, prompt in enumerate(prompts, start=1):
                embeds = encode_prompt(pipe, prompt, preset.max_sequence_length)
                writer.add_prompt(prompt, embeds)
                report("text", i, len(prompts))
            text_seconds = time.perf_counter() - started

            started = time.perf_counter()
            latent_shape, count, total, total_sq = None, 0, 0.0, 0.0
            for first in range(0, len(clips), batch_size):
                batch = clips.iloc[first:first + batch_size]
                videos = [load_clip_video(clip_set, row, geometry["num_frames"]) for _, row in batch.iterrows()]
                latents = encode_videos(pipe, videos, geometry["height"], geometry["width"])
                for (_, row), latent in zip(batch.iterrows(), latents):
                    writer.add_clip(row["clip_id"], row["split"], row["prompt"], latent)
                latent_shape = list(latents.shape[1:])
                count, total, total_sq = (count + latents.numel(), total + latents.double().sum().item(),
                                          total_sq + latents.double().square().sum().item())
                report("latents", first + len(batch), len(clips))
            video_seconds = time.perf_counter() - started

            summary.update(
                latent_shape=latent_shape,
                prompt_embeds_shape=list(embeds.shape),
                prompt_embeds_dtype=str(embeds.dtype).removeprefix("torch."),
                text_seconds=round(text_seconds, 3),
                video_seconds=round(video_seconds, 3),
                clips_per_minute=round(len(clips) * 60 / max(video_seconds, 1e-9), 2),
                # The real VAE's normalised latents sit near mean 0, std 1; far off means a normalisation slip.
                latent_mean=total / count,
                latent_std=max(total_sq / count - (total / count) ** 2, 0.0) ** 0.5,
            )
            writer.finish(summary)
            meta.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
                        num_clips=len(clips), num_prompts=len(prompts))
    finally:
        close()
    path = store.path("latents", key)
    return LatentCacheResult(path, key, LatentCache(path).meta)

