"""Pretrain the `tiny-pusht` base world model: a small Cosmos Predict 2.5 on scripted PushT episodes.

    python -m flywheel.pusht.pretrain --out flywheel/model/weights/tiny-pusht [--device cuda]

    # or in two halves, when the GPU machine has no simulator (gym-pusht / pymunk / pygame):
    python -m flywheel.pusht.pretrain --write-npz pusht_pretrain.npz          # here, CPU, simulator
    python -m flywheel.pusht.pretrain --data-npz pusht_pretrain.npz --out DIR --device cuda

What it does, all a function of `PretrainConfig` (and the seed in it):

1. data: `episodes` scripted PushT demonstrations (flywheel.pusht.sample's ScriptedPusher, the
   `default` look only: the recoloured domain is left for an adapter to learn), rendered at 96 px like
   datasets/pusht, resized to 64 px and resampled 10 -> 16 fps exactly like the clips stage does.
   Their prompts (the clip prompt and its generation variations) are embedded here by the `tiny`
   preset's text encoder built from `text_encoder_seed`, so the training half needs no text encoder.
   The last `holdout_episodes` episodes are never trained on: they measure the VAE and the samples.
2. VAE: an `AutoencoderKLWan` trained on random 17-frame windows with L1 + MSE + a small KL term, on
   the decoder's unclamped output, weighting the first frame and the pixels off the white floor up;
   then the per-channel mean / std of its latents go into its config (Cosmos 2.5 normalises with them).
3. DiT: a `CosmosTransformer3DModel` (2.5 cross-attention projection) trained from scratch, all
   parameters, with the project's rectified-flow step (flywheel.train.lora.training_step: logit-normal
   sigma with a time shift, 1 or 2 clean conditioning latent frames, text dropout for CFG) on the
   normalised latents of every 17-frame window; the saved weights are an EMA of the trained ones.
4. out: `transformer/` and `vae/` (diffusers save_pretrained: config.json + safetensors),
   `flywheel_model.json` (what `load_pipeline("tiny-pusht")` needs besides them: the text encoder seed and
   a fingerprint of its embeddings), `pretrain_report.json` (config, losses, VAE PSNR, sample metrics,
   steps, seconds, device, versions), `loss.png`, and `samples.png` (held-out episodes: real rows
   above generated rows, generated from the real first frame by the saved pipeline). Written to a temp
   dir next to `out` and renamed into place.

The training half imports only torch, numpy, pydantic, pandas, PIL, diffusers, transformers, safetensors
and flywheel modules that import nothing else (the simulator is imported inside the data half only).
Each training phase has a time budget (StepBudget): a machine slower than planned trains fewer steps,
with the LR schedule shortened to match, and the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import platform
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flywheel.image_metrics import psnr as image_psnr

NPZ_FORMAT = "flywheel-pusht-pretrain/1"
MODEL_FORMAT = "flywheel-tiny-pusht/1"
REPORT_FILE = "pretrain_report.json"
SAMPLES_FILE = "samples.png"
LOSS_FILE = "loss.png"
SOURCE_FPS = 10  # flywheel.pusht.sample.FPS: one simulator step per 0.1 s
NUM_FRAMES = 17  # the preset's clip length: 5 latent frames
LATENT_CHANNELS = 16  # Cosmos 2.5's DiT takes 16 latent channels (+1 condition mask)
FLOOR_LEVEL = 0.9  # in [-1, 1]: a pixel with any channel below ~242/255 is not the white floor

Progress = Callable[[dict], None] | None


# ── Config ───────────────────────────────────────────────────────────────────────────────────────


class DataConfig(BaseModel):
    """Which episodes the base model learns from."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    episodes: int = Field(400, ge=2, le=5000, description="scripted episodes to generate (train + held out)")
    holdout_episodes: int = Field(8, ge=1, description="the last N episodes: never trained on; VAE PSNR and samples")
    # datasets/pusht is seed 0 and datasets/pusht_recolored seed 1: another master seed keeps the sample
    # datasets' episodes (the flywheel's evaluation data) out of pretraining.
    data_seed: int = Field(1000, ge=0, lt=2**32, description="master seed of the episodes' initial states")
    max_steps: int = Field(200, ge=8, le=300, description="simulator steps per episode at most (10 per second)")
    render_size: int = Field(96, ge=32, le=512, description="simulator render size, resized to height x width")
    height: int = 64
    width: int = 64
    fps: int = 16
    text_encoder_seed: int = Field(0, ge=0, description="seed of the `tiny` preset text encoder that embeds prompts")


class VaeConfig(BaseModel):
    """The AutoencoderKLWan: shape (z_dim 16 and 4x/8x compression are fixed by the DiT) and training."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    base_dim: int = Field(32, ge=4)
    dim_mult: list[int] = Field(default_factory=lambda: [1, 1, 2, 2], min_length=4, max_length=4)
    num_res_blocks: int = Field(1, ge=1)
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    # The pipeline's whole clip: the Wan VAE's causal caches do not generalise past the windows it was
    # trained on. Measured on CPU: trained on 5-frame windows it reconstructs frames 0-4 of a 17-frame
    # clip at 24 dB and frames 5-16 at 11-16 dB; trained on 9-frame windows, frames 0-8 at 25 dB and
    # frames 11-16 at 10-17 dB.
    clip_frames: int = Field(17, ge=1, description="frames per training window, 4k+1: the first frame + k chunks")
    learning_rate: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    kl_weight: float = Field(1e-6, ge=0, description="on the per-element KL to N(0, 1); L1 and MSE are per-element")
    # The first frame is decoded alone from the first latent (the conditioning frame of image-to-world):
    # weight it like the 4-frame chunks that share each later latent, or it is learnt last and worst.
    first_frame_weight: float = Field(4.0, gt=0)
    # Without it a fresh VAE sits for hundreds of steps on the mean image (a white floor) before it
    # draws the small objects; measured on one clip: 23.6 dB after 150 steps unweighted, 26.4 with 9.
    foreground_weight: float = Field(9.0, ge=0, description="extra loss weight of pixels off the white floor")
    initial_logvar: float = Field(-8.0, description="initial bias of the posterior log-variance (see build_vae)")
    max_grad_norm: float = Field(1.0, gt=0)
    encode_batch_size: int = Field(128, ge=1, description="windows per VAE call when encoding the DiT's latents")
    max_seconds: float = Field(210.0, gt=0, description="time budget of the phase (see StepBudget)")
    # The DiT learns PushT dynamics on the default look only. A LoRA can later adapt it to another look
    # only if the frozen VAE can draw that look: trained on the default colours alone it returned recolored
    # first frames at 1.8 dB (white and green). Training it on both looks costs detail at a fixed budget:
    # on one H200, 1228 steps in 285 s gave 26.6 dB (default) / 27.9 dB (recolored) against 32.8 dB for
    # 1474 default-only steps, and blurry samples, so the committed weights keep ["default"].
    looks: list[Literal["default", "recolored"]] = Field(
        default_factory=lambda: ["default"], min_length=1,
        description="PushT colourings (flywheel.pusht.sample.VARIANTS) the VAE trains on; each window picks one")

    @field_validator("clip_frames")
    @classmethod
    def _frames(cls, v: int) -> int:
        if v % 4 != 1:
            raise ValueError(f"vae.clip_frames must be 4k+1 (the Wan VAE's causal first frame + 4-frame chunks), got {v}")
        return v


class DitConfig(BaseModel):
    """The CosmosTransformer3DModel: shape and full-parameter flow-matching training."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_layers: int = Field(6, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=8)
    mlp_ratio: float = Field(4.0, gt=0)
    adaln_lora_dim: int = Field(32, ge=1)
    steps: int = Field(4000, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(200, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="the saved weights are this EMA of the trained ones")
    window_stride: int = Field(2, ge=1, description="a 17-frame training window starts every N frames")
    cfg_dropout: float = Field(0.2, ge=0, lt=1)
    conditional_frames_probs: dict[int, float] = Field(default_factory=lambda: {1: 0.75, 2: 0.25},
                                                       description="image-to-world (1 latent frame) is the flywheel's use")
    # 8x8 latents need less noise than 720p ones to lose their content: a smaller shift than the 2B's 5.
    time_shift: float = Field(3.0, gt=0)
    max_seconds: float = Field(150.0, gt=0, description="time budget of the phase (see StepBudget)")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


class SampleConfig(BaseModel):
    """The contact sheet and sample metrics: held-out episodes generated from their real first frame."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_episodes: int = Field(4, ge=0, description="held-out episodes to generate (0: none)")
    seed: int = Field(0, ge=0)


class PretrainConfig(BaseModel):
    """Everything the pretrained weights are a function of."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    seed: int = Field(0, ge=0, description="model initialisation and every training draw")
    data: DataConfig = Field(default_factory=DataConfig)
    vae: VaeConfig = Field(default_factory=VaeConfig)
    dit: DitConfig = Field(default_factory=DitConfig)
    samples: SampleConfig = Field(default_factory=SampleConfig)


# ── Data ─────────────────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass
class PushTFrames:
    """Episodes back to back at `fps`, plus the embedded prompts. What the npz holds."""

    frames: np.ndarray  # uint8 [N, H, W, 3]
    episode_lengths: np.ndarray  # int64 [E]
    prompts: list[str]  # prompts[0] is the clip prompt the flywheel uses; the rest are its variations
    prompt_embeds: np.ndarray  # float32 [P, L, D]: the tiny text encoder's, per prompt
    meta: dict[str, Any]  # the DataConfig, reset seeds, simulator versions, text encoder fingerprint

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.episode_lengths)[:-1]]).astype(np.int64)

    def episode(self, index: int) -> np.ndarray:
        start = int(self.episode_starts[index])
        return self.frames[start:start + int(self.episode_lengths[index])]


def training_prompts() -> list[str]:
    """The clips stage's prompt for a default PushT episode, then its generation-time variations."""
    from flywheel.data.clips import ClipConfig
    from flywheel.pusht.sample import VARIANTS
    from flywheel.generate.config import PROMPT_VARIATIONS

    prompt = ClipConfig().prompt_prefix + VARIANTS["default"].task
    return [prompt] + [v.format(prompt=prompt) for v in PROMPT_VARIATIONS]


def embed_prompts(prompts: list[str], seed: int, max_sequence_length: int = 64) -> tuple[np.ndarray, dict]:
    """([P, L, D] float32 embeddings, the text-encoder check that load_pipeline("tiny-pusht") repeats).

    The `tiny` pipeline built on CPU from `seed` holds exactly the text encoder tiny-pusht rebuilds."""
    import transformers

    from flywheel.model.presets import load_pipeline, prompt_fingerprint

    pipe = load_pipeline("tiny", seed=seed, device="cpu")
    with torch.no_grad():
        embeds = [pipe._get_prompt_embeds(p, max_sequence_length=max_sequence_length)[0] for p in prompts]
    check = {"prompt": prompts[0], "fingerprint": prompt_fingerprint(embeds[0][None]),
             "transformers": transformers.__version__}
    return torch.stack(embeds).float().numpy(), check


def generate_episodes(config: DataConfig, progress: Progress = None) -> PushTFrames:
    """Roll out the scripted pusher (needs gym-pusht); frames as the clips stage would make them."""
    from flywheel.data.clips import resample_indices, resize_frame
    from flywheel.pusht.sample import VARIANTS, episode_reset_seed, make_env, rollout_episode

    report = PhaseReporter(progress, "data", config.episodes)
    env = make_env(config.render_size)
    episodes, records = [], []
    try:
        for index in range(config.episodes):
            episode = rollout_episode(env, episode_reset_seed(config.data_seed, index), config.max_steps,
                                      VARIANTS["default"])
            picks = resample_indices(len(episode.images), SOURCE_FPS, config.fps)
            episodes.append(np.stack([resize_frame(episode.images[i], config.height, config.width, "stretch")
                                      for i in picks]))
            records.append({"reset_seed": episode.reset_seed, "source_frames": len(episode.images),
                            "success": episode.success})
            report(step=index + 1, frames=len(picks))
    finally:
        env.close()
        report.close()
    prompts = training_prompts()
    prompt_embeds, check = embed_prompts(prompts, config.text_encoder_seed)
    meta = {"format": NPZ_FORMAT, "data": config.model_dump(), "episodes": records, "text_encoder_check": check,
            "versions": _versions(["gym_pusht", "pymunk", "pygame", "gymnasium"])}
    return PushTFrames(np.concatenate(episodes), np.array([len(e) for e in episodes], np.int64), prompts,
                       prompt_embeds, meta)


def save_npz(data: PushTFrames, path: str | os.PathLike) -> Path:
    """Compressed npz (no pickles), written to a temp file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, frames=data.frames, episode_lengths=data.episode_lengths,
                                prompts=np.array(data.prompts), prompt_embeds=data.prompt_embeds,
                                meta=np.array(json.dumps(data.meta)))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_npz(path: str | os.PathLike) -> PushTFrames:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such episode file; write one with "
                                f"`python -m flywheel.pusht.pretrain --write-npz {path}`")
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("frames", "episode_lengths", "prompts", "prompt_embeds", "meta") if k not in z]
        if missing:
            raise ValueError(f"{path}: not a pretraining episode file (missing {missing}); re-write it with --write-npz")
        data = PushTFrames(z["frames"], z["episode_lengths"].astype(np.int64), [str(p) for p in z["prompts"]],
                           z["prompt_embeds"].astype(np.float32), json.loads(str(z["meta"])))
    if data.meta.get("format") != NPZ_FORMAT:
        raise ValueError(f"{path}: format {data.meta.get('format')!r}, expected {NPZ_FORMAT!r}; re-write it with --write-npz")
    if int(data.episode_lengths.sum()) != len(data.frames):
        raise ValueError(f"{path}: episode lengths sum to {int(data.episode_lengths.sum())} but it holds "
                         f"{len(data.frames)} frames; the file is damaged, re-write it with --write-npz")
    return data


def check_data(data: PushTFrames, config: PretrainConfig) -> None:
    """The episodes fit the config: the right size, enough episodes to hold some out, long enough."""
    d = config.data
    if data.frames.shape[1:] != (d.height, d.width, 3) or data.frames.dtype != np.uint8:
        raise ValueError(f"episode frames are {data.frames.dtype} {list(data.frames.shape[1:])}, the config wants "
                         f"uint8 [{d.height}, {d.width}, 3]; re-generate the episodes with this config")
    if len(data.episode_lengths) <= d.holdout_episodes:
        raise ValueError(f"{len(data.episode_lengths)} episodes but data.holdout_episodes={d.holdout_episodes}: "
                         "generate more episodes or hold out fewer")
    if int(data.episode_lengths.max()) < NUM_FRAMES:
        raise ValueError(f"no episode has {NUM_FRAMES} frames (the longest has {int(data.episode_lengths.max())}); "
                         "raise data.max_steps")


def window_starts(data: PushTFrames, episodes: range | list[int], length: int, stride: int) -> np.ndarray:
    """Global frame index of every `length`-frame window (every `stride` frames) inside the given episodes."""
    starts = [data.episode_starts[e] + np.arange(0, data.episode_lengths[e] - length + 1, stride)
              for e in episodes if data.episode_lengths[e] >= length]
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, np.int64)


def gather_windows(frames: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] -> videos [B, 3, length, H, W] in [-1, 1] (what preprocess_video gives)."""
    index = starts[:, None] + torch.arange(length, device=starts.device)[None]
    return frames[index].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def recolour(video: torch.Tensor, look: str) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] of the default look, shown in `look` (the dataset generator's
    affine colour map, so a recoloured window is what `pusht_sample --variant` would have rendered)."""
    from flywheel.pusht.sample import RENDER_PALETTE, VARIANTS, affine_colour_map

    palette = VARIANTS[look].palette
    if palette is None:
        return video
    colour_map = torch.from_numpy(affine_colour_map(RENDER_PALETTE, palette)).to(video.device)
    rgb = torch.einsum("bcthw,cd->bdthw", (video + 1.0) * 127.5, colour_map[:3]) + colour_map[3].view(1, 3, 1, 1, 1)
    return rgb.round().clamp(0, 255) / 127.5 - 1.0


def mixed_looks(video: torch.Tensor, looks: list[str], generator: torch.Generator) -> torch.Tensor:
    """Each window of the batch recoloured to a look drawn uniformly from `looks` (no host sync)."""
    pick = torch.randint(len(looks), (video.shape[0],), generator=generator, device=video.device)
    out = video
    for i, look in enumerate(looks):
        if look != "default":
            out = torch.where((pick == i).view(-1, 1, 1, 1, 1), recolour(video, look), out)
    return out


# ── Models ───────────────────────────────────────────────────────────────────────────────────────

def build_vae(config: VaeConfig):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=config.base_dim, z_dim=LATENT_CHANNELS, dim_mult=list(config.dim_mult),
                           num_res_blocks=config.num_res_blocks, temperal_downsample=[False, True, True])
    # Fresh, the posterior's log-variance is ~0: noise of std 1 on means of std ~0.4 leaves the decoder
    # nothing to read, it settles on the mean image (a white floor) and the tiny KL weight never pulls it
    # out. Start the noise small instead (std e^-4); training can raise it where it costs nothing.
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:].fill_(config.initial_logvar)
    return vae


def build_transformer(config: DitConfig):
    from diffusers import CosmosTransformer3DModel

    from flywheel.model.presets import TINY_TRANSFORMER

    # The tiny preset's architecture (2.5 cross-attention projection of the tiny text encoder), wider and deeper.
    return CosmosTransformer3DModel(**{
        **TINY_TRANSFORMER,
        "in_channels": LATENT_CHANNELS + 1,
        "out_channels": LATENT_CHANNELS,
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "num_layers": config.num_layers,
        "mlp_ratio": config.mlp_ratio,
        "text_embed_dim": config.hidden_size,
        "adaln_lora_dim": config.adaln_lora_dim,
        "encoder_hidden_states_channels": config.hidden_size,
    })


def warmup_decay(steps: int, warmup_steps: int):
    """The project's linear warm-up / linear decay multiplier, from 1% up to 1, down to 2% at the end."""
    from flywheel.train.schedule import LinearWarmupLinearDecay

    return LinearWarmupLinearDecay(warmup_steps=min(warmup_steps, max(steps - 1, 0)), cycle_length=steps,
                                   f_start=0.01, f_max=1.0, f_min=0.02)


class StepBudget:
    """Fits a phase's step count to its time budget, once, early: from the pace between steps 10 and 40
    (after the first steps' one-off costs), a run that would overrun `max_seconds` is shortened to fit 95%
    of it, and its LR schedule with it, so a slower machine still gets a fully decayed model. A run that
    fits keeps its configured steps (and so stays reproducible); past `max_seconds` it stops regardless."""

    MEASURE_FROM, MEASURE_TO = 10, 40

    def __init__(self, steps: int, warmup_steps: int, max_seconds: float):
        self.planned = self.steps = steps
        self.warmup_steps = warmup_steps
        self.max_seconds = max_seconds
        self.started = time.perf_counter()
        self.mark: float | None = None
        self.seconds_per_step: float | None = None
        self.stopped_early_at: int | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def after_step(self, step: int, lr_scheduler) -> bool:
        """Call after each step; False when the phase must end now."""
        if step == self.MEASURE_FROM:
            self.mark = self.elapsed()
        elif step == self.MEASURE_TO and self.mark is not None and self.steps > step:
            self.seconds_per_step = (self.elapsed() - self.mark) / (self.MEASURE_TO - self.MEASURE_FROM)
            affordable = step + int((0.95 * self.max_seconds - self.elapsed()) / self.seconds_per_step)
            if affordable < self.steps:
                self.steps = max(step + 1, affordable)
                lr_scheduler.lr_lambdas[0] = warmup_decay(self.steps, self.warmup_steps)
        if step < self.steps and self.elapsed() > self.max_seconds:
            self.stopped_early_at = step
            return False
        return step < self.steps

    def record(self, steps_done: int) -> dict[str, Any]:
        record = {"steps": steps_done, "planned_steps": self.planned, "seconds": round(self.elapsed(), 2)}
        if self.seconds_per_step is not None:
            record["seconds_per_step"] = round(self.seconds_per_step, 5)
        if self.steps != self.planned:
            record["steps_fitted_to_budget"] = self.steps
        if self.stopped_early_at is not None:
            record["stopped_early_at_step"] = self.stopped_early_at
        return record


# ── VAE ──────────────────────────────────────────────────────────────────────────────────────────


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode(z)` before its final clamp to [-1, 1]: the clamp passes no gradient to the pixels it clips,
    so a decoder that overshoots white (most of a PushT frame) would never learn the objects on it."""
    chunks: list[torch.Tensor] = []
    handle = vae.decoder.register_forward_hook(lambda module, args, output: chunks.append(output))
    try:
        vae.decode(z)
    finally:
        handle.remove()
    return torch.cat(chunks, dim=2)


def pixel_weights(video: torch.Tensor, config: VaeConfig) -> torch.Tensor:
    """[B, 1, T, H, W] loss weights, mean 1: the first frame x first_frame_weight, and pixels off the white
    floor (the T, the target, the agent: under a tenth of a frame) x (1 + foreground_weight), so the
    reconstruction of the objects is not drowned by the floor's, which a VAE gets right from its first steps.
    `video` is the default look (the floor is white there), whatever look the step trains on."""
    weights = 1.0 + config.foreground_weight * (video < FLOOR_LEVEL).any(dim=1, keepdim=True).float()
    weights[:, :, 0] *= config.first_frame_weight
    return weights / weights.mean()


def vae_step(vae, optimizer, lr_scheduler, default_video: torch.Tensor, generator: torch.Generator,
             config: VaeConfig) -> dict[str, float]:
    """One VAE step on default-look windows, each shown in one of config.looks: encode, sample the posterior,
    decode (unclamped); weighted L1 + MSE + kl_weight * KL; clip, step. The reported psnr is the plain one
    of this batch."""
    weights = pixel_weights(default_video, config)
    video = mixed_looks(default_video, config.looks, generator)
    posterior = vae.encode(video).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator, device=video.device)
    error = decode_unclamped(vae, z) - video
    l1 = (error.abs() * weights).mean()
    weighted_mse = (error.square() * weights).mean()
    kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
    loss = l1 + weighted_mse + config.kl_weight * kl
    mse = error.square().mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # MSE on [-1, 1] is 4x the MSE on [0, 1]: the PSNR of this batch's reconstruction.
    return {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(), "grad_norm": float(grad_norm),
            "psnr": 10 * math.log10(4.0 / max(mse.item(), 1e-12))}


def train_vae(frames: torch.Tensor, data: PushTFrames, train_episodes: range, config: VaeConfig, seed: int,
              progress: Progress = None) -> tuple[Any, dict[str, Any]]:
    """A fresh VAE trained on random windows of the training episodes; (vae, history)."""
    device = frames.device
    torch.manual_seed(seed)
    vae = build_vae(config).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.learning_rate, weight_decay=0.0)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(config.steps, config.warmup_steps))
    starts = torch.from_numpy(window_starts(data, train_episodes, config.clip_frames, 1)).to(device)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    history: dict[str, Any] = {"loss": [], "psnr": []}
    budget = StepBudget(config.steps, config.warmup_steps, config.max_seconds)
    report = PhaseReporter(progress, "vae", config.steps)
    try:
        step, going = 0, True
        while going:
            step += 1
            pick = torch.randint(len(starts), (config.batch_size,), generator=generator, device=device)
            stats = vae_step(vae, optimizer, lr_scheduler, gather_windows(frames, starts[pick], config.clip_frames),
                             generator, config)
            history["loss"].append(round(stats["loss"], 6))
            history["psnr"].append(round(stats["psnr"], 3))
            going = budget.after_step(step, lr_scheduler)
            report(step=step, steps=budget.steps, loss=stats["loss"], psnr=stats["psnr"],
                   lr=lr_scheduler.get_last_lr()[0])
    finally:
        report.close()
    history.update(budget.record(step))
    return vae.eval().requires_grad_(False), history


@torch.no_grad()
def encode_windows(vae, frames: torch.Tensor, starts: np.ndarray, batch_size: int) -> torch.Tensor:
    """Posterior means [W, 16, 5, 8, 8] of the 17-frame windows (the pipeline's `argmax` latents)."""
    starts_t = torch.from_numpy(starts).to(frames.device)
    out = [vae.encode(gather_windows(frames, starts_t[i:i + batch_size], NUM_FRAMES)).latent_dist.mean
           for i in range(0, len(starts_t), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae, frames: torch.Tensor, starts: np.ndarray, batch_size: int, look: str = "default") -> float:
    """Mean PSNR (dB, uint8 frames) of encode-mean -> decode over the given 17-frame windows, shown in `look`."""
    starts_t = torch.from_numpy(starts).to(frames.device)
    psnrs = []
    for i in range(0, len(starts_t), batch_size):
        video = recolour(gather_windows(frames, starts_t[i:i + batch_size], NUM_FRAMES), look)
        decoded = vae.decode(vae.encode(video).latent_dist.mean).sample
        for real, fake in zip(to_uint8(video), to_uint8(decoded)):
            psnrs.append(psnr(real, fake))
    return float(np.mean(psnrs))


def latent_statistics(latents: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over windows, frames and positions: Cosmos 2.5's latents_mean / latents_std."""
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1).double()
    return [round(float(v), 6) for v in flat.mean(1)], [round(float(v), 6) for v in flat.std(1).clamp_min(1e-4)]


# ── Transformer ──────────────────────────────────────────────────────────────────────────────────


class Ema:
    """Exponential moving average of a model's parameters (decay warms up from 0.1 so early steps count)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in model.parameters()], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for p, s in zip(model.parameters(), self.shadow, strict=True):
            p.copy_(s)


def flow_recipe(config: DitConfig, seed: int):
    """The flow-matching draws of flywheel.train.lora, as its TrainConfig (its LoRA fields go unused here)."""
    from flywheel.train.config import TrainConfig

    return TrainConfig(steps=config.steps, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                       max_grad_norm=config.max_grad_norm, cfg_dropout=config.cfg_dropout,
                       conditional_frames_probs=config.conditional_frames_probs, time_shift=config.time_shift,
                       seed=seed)


def train_transformer(latents: torch.Tensor, prompt_embeds: torch.Tensor, config: DitConfig, seed: int,
                      height: int, width: int, progress: Progress = None) -> tuple[Any, dict[str, Any]]:
    """A fresh DiT, all parameters trained on random (window, prompt) pairs; returns (EMA model, history).

    latents [W, 16, 5, 8, 8] normalised; prompt_embeds [P, L, D]."""
    from flywheel.train.lora import training_step

    device = latents.device
    recipe = flow_recipe(config, seed)
    torch.manual_seed(seed + 2)
    transformer = build_transformer(config).to(device).train()
    params = list(transformer.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(config.steps, config.warmup_steps))
    ema = Ema(transformer, config.ema_decay)
    generator = torch.Generator(device=device).manual_seed(seed + 3)
    padding_mask = torch.zeros(1, 1, height, width, device=device)
    history: dict[str, Any] = {"loss": []}
    budget = StepBudget(config.steps, config.warmup_steps, config.max_seconds)
    report = PhaseReporter(progress, "dit", config.steps)
    try:
        step, going = 0, True
        while going:
            step += 1
            pick = torch.randint(len(latents), (config.batch_size,), generator=generator, device=device)
            prompt = torch.randint(len(prompt_embeds), (config.batch_size,), generator=generator, device=device)
            stats = training_step(transformer, params, optimizer, lr_scheduler, latents[pick], prompt_embeds[prompt],
                                  padding_mask, generator, recipe)
            ema.update(transformer)
            history["loss"].append(round(stats["loss"], 6))
            going = budget.after_step(step, lr_scheduler)
            report(step=step, steps=budget.steps, loss=stats["loss"], lr=stats["lr"])
    finally:
        report.close()
    ema.copy_to(transformer)
    history.update(budget.record(step))
    return transformer.eval().requires_grad_(False), history


# ── Samples ──────────────────────────────────────────────────────────────────────────────────────


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3]."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Uncapped (a frozen clip must read as far above any real one)."""
    return image_psnr(a, b, cap=None)


def rollout_metrics(generated: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """How a generated clip compares with the real one it started from (uint8 [T, H, W, 3] each).

    first_frame_psnr: the conditioning frame came back; psnr_vs_real: frames 1.. against the real
    continuation; psnr_static_vs_real: the same for a video that never moves (the bar to beat);
    motion / real_motion: mean |frame t - frame 0| (uint8 levels), so a frozen video shows as ~0."""
    return {
        "first_frame_psnr": psnr(generated[0], real[0]),
        "psnr_vs_real": float(np.mean([psnr(g, r) for g, r in zip(generated[1:], real[1:])])),
        "psnr_static_vs_real": float(np.mean([psnr(real[0], r) for r in real[1:]])),
        "motion": float(np.abs(generated[1:].astype(np.float64) - generated[:1]).mean()),
        "real_motion": float(np.abs(real[1:].astype(np.float64) - real[:1]).mean()),
    }


def generate_samples(pipe, data: PushTFrames, episodes: list[int], seed: int) -> tuple[list[dict], list, list[str]]:
    """Generate each episode's first clip from its real first frame with the saved pipeline.

    Returns (per-episode metrics, contact sheet videos, labels): real rows then generated rows."""
    from PIL import Image

    preset = pipe.flywheel_preset
    prompt_embeds = torch.from_numpy(data.prompt_embeds[:1]).to(pipe._execution_device)
    rows, videos, labels = [], [], []
    for i, episode in enumerate(episodes):
        real = data.episode(episode)[:NUM_FRAMES]
        output = pipe(image=Image.fromarray(real[0]), prompt_embeds=prompt_embeds, num_frames=NUM_FRAMES,
                      height=preset.height, width=preset.width, num_inference_steps=preset.num_inference_steps,
                      guidance_scale=preset.guidance_scale, generator=torch.Generator().manual_seed(seed + i),
                      output_type="np", max_sequence_length=preset.max_sequence_length)
        generated = (np.clip(output.frames[0], 0.0, 1.0) * 255.0).round().astype(np.uint8)
        rows.append({"episode": episode, "seed": seed + i, **{k: round(v, 3) for k, v in
                                                               rollout_metrics(generated, real).items()}})
        videos += [real, generated]
        labels += [f"held-out episode {episode}: real", f"held-out episode {episode}: generated (seed {seed + i})"]
    return rows, videos, labels


def evaluate_weights(weights_dir: Path, data: PushTFrames, config: PretrainConfig, device: torch.device,
                     progress: Progress = None) -> dict[str, Any]:
    """Sample metrics + samples.png for a weights dir, with the pipeline `load_pipeline("tiny-pusht")` builds."""
    from flywheel.preview import contact_sheet
    from flywheel.model.presets import load_pipeline

    count = min(config.samples.num_episodes, config.data.holdout_episodes)
    episodes = [e for e in range(len(data.episode_lengths) - config.data.holdout_episodes, len(data.episode_lengths))
                if data.episode_lengths[e] >= NUM_FRAMES][:count]
    if not episodes:
        return {"episodes": []}
    started = time.perf_counter()
    pipe = load_pipeline("tiny-pusht", weights_dir=weights_dir, device=device)
    rows, videos, labels = generate_samples(pipe, data, episodes, config.samples.seed)
    seconds = time.perf_counter() - started
    contact_sheet(videos, labels, Path(weights_dir) / SAMPLES_FILE, frames_per_video=9)
    summary = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0] if k not in ("episode", "seed")}
    result = {"episodes": rows, "mean": summary, "seconds": round(seconds, 2), "device": str(device),
              "num_inference_steps": pipe.flywheel_preset.num_inference_steps,
              "guidance_scale": pipe.flywheel_preset.guidance_scale}
    if progress:
        progress({"stage": "pretrain", "phase": "samples", **summary})
    return result


# ── The run ──────────────────────────────────────────────────────────────────────────────────────


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device; use --device cpu (with small step counts)")
    return device


def pretrain(
    config: PretrainConfig,
    out: str | os.PathLike,
    *,
    data: PushTFrames | None = None,
    device: str | torch.device | None = None,
    force: bool = False,
    progress: Progress = None,
) -> dict[str, Any]:
    """Generate (or take) the episodes, train VAE then DiT, write the weights dir `out`; returns the report."""
    started = time.perf_counter()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    device = resolve_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if data is None:
        data = generate_episodes(config.data, progress)
    check_data(data, config)
    episodes = len(data.episode_lengths)
    train_episodes = range(episodes - config.data.holdout_episodes)
    holdout_episodes = range(episodes - config.data.holdout_episodes, episodes)
    frames = torch.from_numpy(data.frames).to(device)

    vae, vae_history = train_vae(frames, data, train_episodes, config.vae, config.seed, progress)
    holdout_starts = window_starts(data, holdout_episodes, NUM_FRAMES, NUM_FRAMES)
    vae_history["holdout_psnr"] = round(reconstruction_psnr(vae, frames, holdout_starts, config.vae.encode_batch_size), 3)
    vae_history["holdout_psnr_by_look"] = {
        look: round(reconstruction_psnr(vae, frames, holdout_starts, config.vae.encode_batch_size, look), 3)
        for look in config.vae.looks}
    vae_history["holdout_windows"] = len(holdout_starts)
    _emit(progress, phase="vae_done", holdout_psnr=vae_history["holdout_psnr"],
          by_look=vae_history["holdout_psnr_by_look"])

    encode_started = time.perf_counter()
    train_starts = window_starts(data, train_episodes, NUM_FRAMES, config.dit.window_stride)
    mu = encode_windows(vae, frames, train_starts, config.vae.encode_batch_size)
    latents_mean, latents_std = latent_statistics(mu)
    vae.register_to_config(latents_mean=latents_mean, latents_std=latents_std)
    mean_t = torch.tensor(latents_mean, device=device).view(1, -1, 1, 1, 1)
    std_t = torch.tensor(latents_std, device=device).view(1, -1, 1, 1, 1)
    latents = ((mu - mean_t) / std_t).float()
    del mu
    encode_seconds = round(time.perf_counter() - encode_started, 2)
    _emit(progress, phase="latents", windows=len(train_starts), seconds=encode_seconds)

    prompt_embeds = torch.from_numpy(data.prompt_embeds).to(device)
    transformer, dit_history = train_transformer(latents, prompt_embeds, config.dit, config.seed,
                                                 config.data.height, config.data.width, progress)
    del latents

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        transformer.to("cpu").save_pretrained(tmp / "transformer", safe_serialization=True)
        vae.to("cpu").save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "flywheel_model.json").write_text(json.dumps(model_card(config, data), indent=2) + "\n")
        report = {
            "format": MODEL_FORMAT,
            "config": config.model_dump(mode="json"),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "data": {"episodes": episodes, "train_episodes": len(train_episodes), "holdout_episodes": len(holdout_episodes),
                     "frames": int(len(data.frames)), "train_windows": int(len(train_starts)),
                     "prompts": data.prompts, "source": data.meta.get("source", "generated")},
            "vae": {**vae_history, "parameters": _count(vae), "latents_mean": latents_mean, "latents_std": latents_std},
            "encode_seconds": encode_seconds,
            "dit": {**dit_history, "parameters": _count(transformer)},
            "weights_bytes": sum(f.stat().st_size for f in tmp.rglob("*.safetensors")),
            "versions": _versions(["torch", "diffusers", "transformers", "numpy"]),
        }
        _write_loss_plots(tmp, vae_history["loss"], dit_history["loss"])
        try:
            report["samples"] = evaluate_weights(tmp, data, config, device, progress)
        except Exception as e:  # the weights are good without pictures: keep them, say what failed
            report["samples"] = {"error": f"{type(e).__name__}: {e}",
                                 "redo": "python -m flywheel.pusht.pretrain --evaluate-only --out DIR --data-npz NPZ"}
        report["seconds"] = round(time.perf_counter() - started, 2)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)  # safetensors come out owner-only; these get committed
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def evaluate_only(out: str | os.PathLike, data: PushTFrames, device: str | torch.device | None = None,
                  progress: Progress = None) -> dict[str, Any]:
    """Redo samples.png and the report's sample metrics for an existing weights dir (e.g. on a 2-core CPU)."""
    from flywheel.store import atomic_write_bytes

    out = Path(out)
    report_path = out / REPORT_FILE
    if not report_path.is_file():
        raise FileNotFoundError(f"{out}: no {REPORT_FILE}; this is not a pretrain_pusht output directory")
    report = json.loads(report_path.read_text())
    config = PretrainConfig.model_validate(report["config"])
    device = resolve_device(device)
    report["samples"] = evaluate_weights(out, data, config, device, progress)
    atomic_write_bytes(report_path, (json.dumps(report, indent=1) + "\n").encode())
    return report


def model_card(config: PretrainConfig, data: PushTFrames) -> dict[str, Any]:
    """flywheel_model.json: what load_pipeline("tiny-pusht") needs besides the two diffusers components."""
    return {
        "format": MODEL_FORMAT,
        "model_id": "flywheel/tiny-pusht",
        "text_encoder": "the `tiny` preset's Qwen2.5-VL, rebuilt on CPU from text_encoder_seed (not saved)",
        "text_encoder_seed": config.data.text_encoder_seed,
        "text_encoder_check": data.meta["text_encoder_check"],
        "training_prompts": data.prompts,
        "height": config.data.height, "width": config.data.width, "num_frames": NUM_FRAMES, "fps": config.data.fps,
        "pretrain_seed": config.seed,
        "vae_looks": list(config.vae.looks),
        "reproduce": "python -m flywheel.pusht.pretrain --out DIR --seed "
                     f"{config.seed} --episodes {config.data.episodes} (see pretrain_report.json for every setting)",
    }


def _write_loss_plots(out: Path, vae_losses: list[float], dit_losses: list[float]) -> None:
    from PIL import Image

    from flywheel.train.loss_plot import draw_loss_curve

    a = draw_loss_curve(vae_losses, "VAE: L1 + MSE + KL")
    b = draw_loss_curve(dit_losses, "DiT: flow-matching loss")
    sheet = Image.new("RGB", (a.width + b.width, max(a.height, b.height)), (255, 255, 255))
    sheet.paste(a, (0, 0))
    sheet.paste(b, (a.width, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    (out / LOSS_FILE).write_bytes(buffer.getvalue())


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _versions(names: list[str]) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            found[name] = None
    return found


def _emit(progress: Progress, **event) -> None:
    event = {"stage": "pretrain", **event}
    if progress is not None:
        progress(event)


class PhaseReporter:
    """Progress of one phase: the callback when given, else a tqdm bar."""

    def __init__(self, progress: Progress, phase: str, total: int):
        self.progress, self.phase, self.total = progress, phase, total
        self.started = time.perf_counter()
        self.bar = None
        if progress is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=phase, leave=False)

    def __call__(self, step: int, steps: int | None = None, **values) -> None:
        if steps is not None and steps != self.total:
            self.total = steps
            if self.bar is not None:
                self.bar.total = steps
        if self.progress is not None:
            self.progress({"stage": "pretrain", "phase": self.phase, "step": step, "steps": self.total,
                           "seconds": round(time.perf_counter() - self.started, 2), **values})
        else:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ── CLI ──────────────────────────────────────────────────────────────────────────────────────────


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    data = dict(episodes=args.episodes, holdout_episodes=args.holdout_episodes, max_steps=args.max_steps,
                data_seed=args.data_seed)
    vae = dict(steps=args.vae_steps, batch_size=args.vae_batch_size, clip_frames=args.vae_clip_frames, base_dim=args.vae_base_dim,
               dim_mult=[int(v) for v in args.vae_dim_mult.split(",")], max_seconds=args.vae_seconds,
               looks=args.vae_looks.split(","))
    dit = dict(steps=args.dit_steps, batch_size=args.dit_batch_size, window_stride=args.dit_window_stride,
               num_layers=args.dit_layers,
               num_attention_heads=args.dit_heads, attention_head_dim=args.dit_head_dim, max_seconds=args.dit_seconds)
    return PretrainConfig(seed=args.seed, data=data, vae=vae, dit=dit, samples=dict(num_episodes=args.samples))


def print_progress(every: int) -> Callable[[dict], None]:
    """CLI progress: one line per `every` steps of a phase (and each phase's end), flushed for remote logs."""

    def show(event: dict) -> None:
        step, steps = event.get("step"), event.get("steps")
        if step is not None and step % every and step != steps and event.get("phase") != "data":
            return
        if event.get("phase") == "data" and step % max(1, every // 10) and step != steps:
            return
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in event.items() if k not in ("stage", "phase"))
        print(f"[pretrain_pusht {event.get('phase')}] {fields}", flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    d, v, t = DataConfig(), VaeConfig(), DitConfig()
    parser = argparse.ArgumentParser(prog="python -m flywheel.pusht.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="weights directory to write (flywheel/model/weights/tiny-pusht)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--episodes", type=int, default=d.episodes)
    parser.add_argument("--holdout-episodes", type=int, default=d.holdout_episodes)
    parser.add_argument("--max-steps", type=int, default=d.max_steps, help="simulator steps per episode at most")
    parser.add_argument("--data-seed", type=int, default=d.data_seed)
    parser.add_argument("--write-npz", type=Path, help="only generate the episodes (needs gym-pusht) into this .npz")
    parser.add_argument("--data-npz", type=Path, help="train on the episodes of this .npz instead of generating them")
    parser.add_argument("--vae-steps", type=int, default=v.steps)
    parser.add_argument("--vae-batch-size", type=int, default=v.batch_size)
    parser.add_argument("--vae-clip-frames", type=int, default=v.clip_frames, help="frames per VAE training window (4k+1)")
    parser.add_argument("--vae-base-dim", type=int, default=v.base_dim)
    parser.add_argument("--vae-dim-mult", default=",".join(map(str, v.dim_mult)))
    parser.add_argument("--dit-steps", type=int, default=t.steps)
    parser.add_argument("--dit-batch-size", type=int, default=t.batch_size)
    parser.add_argument("--dit-window-stride", type=int, default=t.window_stride)
    parser.add_argument("--dit-layers", type=int, default=t.num_layers)
    parser.add_argument("--dit-heads", type=int, default=t.num_attention_heads)
    parser.add_argument("--dit-head-dim", type=int, default=t.attention_head_dim)
    parser.add_argument("--vae-looks", default=",".join(v.looks),
                        help="comma-separated PushT colourings the VAE learns (default,recolored)")
    parser.add_argument("--vae-seconds", type=float, default=v.max_seconds,
                        help="VAE time budget: fewer steps if the pace says it would overrun (see StepBudget)")
    parser.add_argument("--dit-seconds", type=float, default=t.max_seconds, help="DiT time budget, likewise")
    parser.add_argument("--samples", type=int, default=SampleConfig().num_episodes, help="held-out episodes to sample")
    parser.add_argument("--evaluate-only", action="store_true", help="redo samples.png + sample metrics of --out")
    parser.add_argument("--print-every", type=int, default=100)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    show = print_progress(args.print_every)
    try:
        config = config_from_args(args)
        if args.write_npz:
            if args.data_npz:
                parser.error("--write-npz generates episodes, --data-npz reads them: pass one")
            data = generate_episodes(config.data, show)
            path = save_npz(data, args.write_npz)
            print(f"wrote {path}: {len(data.episode_lengths)} episodes, {len(data.frames)} frames, "
                  f"{path.stat().st_size / 1e6:.1f} MB", flush=True)
            return 0
        if args.out is None:
            parser.error("--out is required (or --write-npz to only generate episodes)")
        data = load_npz(args.data_npz) if args.data_npz else None
        if args.evaluate_only:
            if data is None:
                parser.error("--evaluate-only needs --data-npz (the held-out episodes to compare with)")
            report = evaluate_only(args.out, data, args.device, show)
        else:
            if data is not None:
                data.meta["source"] = str(args.data_npz)
                if data.meta["data"] != config.data.model_dump():
                    # The episodes are what they are: the report must describe them, not the flags.
                    print(f"note: {args.data_npz} holds episodes made with data settings {data.meta['data']}; "
                          "the report records those", flush=True)
                    config = config.model_copy(update={"data": DataConfig.model_validate(data.meta["data"])})
            report = pretrain(config, args.out, data=data, device=args.device, force=args.force, progress=show)
    except (FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = {k: report.get(k) for k in ("device", "seconds", "weights_bytes")}
    summary["vae_holdout_psnr"] = report.get("vae", {}).get("holdout_psnr")
    summary["samples"] = report.get("samples", {}).get("mean", report.get("samples", {}).get("error"))
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
