"""LoRA / DoRA adapter training on a frozen Cosmos Predict 2.5 transformer, from a latent cache.

The math is the public diffusers recipe (examples/cosmos/train_cosmos_predict25_lora.py):

- rectified flow: x_t = noise * sigma + x0 * (1 - sigma), the transformer predicts v = noise - x0;
- sigma from a logit-normal time with shift 5: t = sigmoid(randn), sigma = 5t / (1 + 4t);
- the first 1 or 2 latent frames are conditioning: clean latents in x_t, timestep 1e-4, and the
  prediction is replaced by the target there, so the loss only counts the frames to be generated;
- 20% of samples see a zeroed text embedding, which is what classifier-free guidance needs.

Every random draw comes from generators seeded by `config.seed` and saved in checkpoints, so on CPU
a run killed and resumed ends with the same adapter, bit for bit, as one that ran straight through.
`training_step` is the whole step; `flow_matching_loss` is the loss alone (for evaluation and for a
compiled GPU path). How fast the step runs (activation checkpointing, regional compile, fused AdamW)
is flywheel.train.speed, switched by config fields; the math is the same either way.

Several GPUs (`torchrun --nproc-per-node N`, see flywheel.train.distributed): data parallel, and
`config.batch_size` is the GLOBAL batch. Every rank draws the same global batch of clips and the same
global noise/sigma/conditioning/dropout, takes its contiguous shard, and the adapter gradients are
averaged over ranks before clipping and the optimizer step. So N processes compute what one process
computes on the whole batch (up to float summation order), the LR schedule is unchanged, and the
checkpoints (written by rank 0) hold nothing rank-dependent: a run resumes on any number of GPUs.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flywheel.data.latent_cache import LatentCache
from flywheel.errors import ConfigError
from flywheel.store import hash_file
from flywheel.train import checkpoint as ckpt
from flywheel.train.adapter_io import (
    ADAPTER_CARD,
    ADAPTER_WEIGHTS,
    TRAINING_ADAPTER_NAME,
    AdapterCard,
    read_card,
    read_saved_adapter,
    remove_adapter,
    save_adapter,
)
from flywheel.train.config import SPEED_FIELDS, TrainConfig, TrainingModeChoice
from flywheel.train.distributed import SINGLE, World, current_world
from flywheel.train.loss_plot import write_loss_plot
from flywheel.train.speed import (
    adapter_autocast,
    apply_training_speedups,
    build_optimizer_and_scheduler,
    memory_advice,
)

ADAPTER_DIR = "adapter"
FINAL_LOSS_WINDOW = 10  # the card's final_loss: mean of the last steps, one step's loss is too noisy


@dataclasses.dataclass
class TrainResult:
    adapter_dir: Path
    card: dict[str, Any]
    losses: list[float]
    resumed_from_step: int = 0  # 0: started fresh; kept out of the card so resumed and straight runs match
    seconds: float = 0.0
    training_mode: TrainingModeChoice | None = None  # with the free memory it was chosen from (not in the card)
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each step this call ran


# --- one step ---------------------------------------------------------------------------------


@dataclasses.dataclass
class FlowDraw:
    """The random draws of one training step for a batch of B clips."""

    noise: torch.Tensor  # [B, C, T, H, W]
    sigma: torch.Tensor  # [B], in (0, 1)
    num_cond_frames: torch.Tensor  # [B] long, 1 or 2
    drop_text: torch.Tensor  # [B] bool

    def shard(self, index: slice) -> FlowDraw:
        """The draws of samples `index` of the batch (one rank's share of the global batch)."""
        return FlowDraw(noise=self.noise[index], sigma=self.sigma[index], num_cond_frames=self.num_cond_frames[index],
                        drop_text=self.drop_text[index])


def sample_flow_draw(latent_shape: torch.Size | tuple[int, ...], config: TrainConfig, generator: torch.Generator) -> FlowDraw:
    """Draw sigma, conditioning frames, text dropout and noise, always in this order (resumability)."""
    batch = latent_shape[0]
    device = generator.device
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    sigma = config.time_shift * t / (1 + (config.time_shift - 1) * t)
    frame_options = torch.tensor(list(config.conditional_frames_probs), device=device)
    frame_weights = torch.tensor(list(config.conditional_frames_probs.values()), dtype=torch.float32, device=device)
    num_cond_frames = frame_options[torch.multinomial(frame_weights, batch, replacement=True, generator=generator)]
    drop_text = torch.rand(batch, generator=generator, device=device) < config.cfg_dropout
    noise = torch.randn(tuple(latent_shape), generator=generator, device=device)
    return FlowDraw(noise=noise, sigma=sigma, num_cond_frames=num_cond_frames, drop_text=drop_text)


def condition_mask(num_cond_frames: torch.Tensor, latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indicator [B,1,T,1,1], mask [B,1,T,H,W]): 1 on each sample's first `num_cond_frames` latent frames.

    Same as `Cosmos2_5_PredictBasePipeline.create_condition_mask`, with per-sample counts as a tensor.
    """
    batch, _, frames, height, width = latent_shape
    frame_index = torch.arange(frames, device=num_cond_frames.device)
    indicator = (frame_index[None, :] < num_cond_frames[:, None]).float().view(batch, 1, frames, 1, 1)
    return indicator, indicator.expand(-1, -1, -1, height, width)


def flow_matching_loss(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    draw: FlowDraw,
    padding_mask: torch.Tensor,
    conditional_frame_timestep: float = 1e-4,
) -> torch.Tensor:
    """Mean squared velocity error on the non-conditioning frames (fp32 scalar).

    latents [B,C,T,H,W] fp32 normalised clean latents; prompt_embeds [B,L,D]; padding_mask [1,1,H_px,W_px].
    """
    latents = latents.float()
    batch = latents.shape[0]
    indicator, mask = condition_mask(draw.num_cond_frames, tuple(latents.shape))
    sigma = draw.sigma.float().view(batch, 1, 1, 1, 1)
    x_t = draw.noise * sigma + latents * (1 - sigma)
    x_t = latents * mask + x_t * (1 - mask)
    target = draw.noise - latents
    if conditional_frame_timestep >= 0:
        timestep = indicator * conditional_frame_timestep + (1 - indicator) * sigma
    else:
        timestep = draw.sigma.float()
    text = prompt_embeds.masked_fill(draw.drop_text.view(batch, 1, 1), 0.0)
    dtype = transformer.dtype
    pred = transformer(
        hidden_states=x_t.to(dtype),
        condition_mask=mask.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text.to(dtype),
        padding_mask=padding_mask.to(dtype),
        return_dict=False,
    )[0]
    pred = target * mask + pred.float() * (1 - mask)
    return F.mse_loss(pred, target)


def training_step(
    transformer: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    padding_mask: torch.Tensor,
    generator: torch.Generator,
    config: TrainConfig,
    world: World = SINGLE,
) -> dict[str, float]:
    """One optimizer step: draw noise/sigma/conditioning/dropout, velocity loss, backward, clip, step.

    `latents` / `prompt_embeds` are this rank's shard of the global batch. The draws are made for the
    whole global batch on every rank (the generator stays in step everywhere) and sharded like the clips;
    the gradients are averaged over ranks, so every rank takes the same optimizer step.
    """
    global_shape = (latents.shape[0] * world.world_size, *latents.shape[1:])
    draw = sample_flow_draw(global_shape, config, generator).shard(world.shard(global_shape[0]))
    with adapter_autocast(transformer, config):
        loss = flow_matching_loss(transformer, latents, prompt_embeds, draw, padding_mask,
                                  config.conditional_frame_timestep)
    loss.backward()
    world.average_gradients(params)  # only the adapter's parameters have gradients; no-op on one process
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    lr = lr_scheduler.get_last_lr()[0]
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": world.mean(loss).item(), "grad_norm": float(grad_norm), "lr": lr}


# --- data order ---------------------------------------------------------------------------------


class ClipSampler:
    """Shuffled passes over the training clips, drawn from its own generator (checkpointed)."""

    def __init__(self, clip_ids: list[str], seed: int):
        self.clip_ids = list(clip_ids)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def next_batch(self, batch_size: int) -> list[str]:
        batch = []
        while len(batch) < batch_size:
            if self.position >= len(self.order):
                self.order = torch.randperm(len(self.clip_ids), generator=self.generator).tolist()
                self.position = 0
            batch.append(self.clip_ids[self.order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": list(self.order), "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = list(state["order"])
        self.position = int(state["position"])


def load_batch(cache: LatentCache, clip_ids: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [cache.load(clip_id) for clip_id in clip_ids]
    shapes = {tuple(s.latent.shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"{cache.root}: clips {clip_ids} have different latent shapes {sorted(shapes)}; "
                         "a batch needs one shape (re-encode the cache at one resolution, or use batch_size 1)")
    latents = torch.stack([s.latent for s in samples]).to(device=device, dtype=torch.float32)
    # [L, D] per the cache format; tolerate the [1, L, D] that `pipe._get_prompt_embeds` returns
    prompt_embeds = torch.stack([s.prompt_embeds.reshape(s.prompt_embeds.shape[-2:]) for s in samples]).to(device=device)
    return latents, prompt_embeds


# --- the adapter --------------------------------------------------------------------------------


def lora_config(config: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        init_lora_weights=True,
        target_modules=list(config.target_modules),
        use_dora=config.use_dora,
    )


def add_training_adapter(transformer: torch.nn.Module, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Inject the adapter (fp32 trainable tensors on a frozen base); returns the trainable parameters.

    LoRA A is initialised from the global RNG: a forked RNG seeded by config.seed keeps that
    deterministic without disturbing the caller's random state.
    """
    existing = list(getattr(transformer, "peft_config", {}) or {})
    if existing:
        raise ValueError(f"the pipeline's transformer already carries adapters {existing}; "
                         "call flywheel.train.adapter_io.remove_adapter(pipe) before training")
    transformer.requires_grad_(False)
    devices = [transformer.device] if transformer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        transformer.add_adapter(lora_config(config), adapter_name=TRAINING_ADAPTER_NAME)
    if transformer.dtype != torch.float32:
        from diffusers.training_utils import cast_training_params

        cast_training_params(transformer, dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"target_modules {config.target_modules} matched no layer of the transformer")
    return params


def training_adapter_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft layout (what a checkpoint stores)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=TRAINING_ADAPTER_NAME)


def set_training_adapter_weights(transformer: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, weights, adapter_name=TRAINING_ADAPTER_NAME)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    missing = [k for k in getattr(result, "missing_keys", []) if "lora" in k and TRAINING_ADAPTER_NAME in k]
    if unexpected or missing:
        raise ValueError(f"{source}: adapter tensors do not fit this model/config "
                         f"(unexpected {unexpected[:3]}, missing {missing[:3]}); check rank, method and target_modules")


def init_from_parent(transformer: torch.nn.Module, parent_dir: Path, config: TrainConfig) -> AdapterCard:
    """Start from a saved parent adapter (same method, rank, alpha, targets); returns the parent's card."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    if not (Path(parent_dir) / ADAPTER_CARD).is_file():
        raise ConfigError(f"train.init_adapter {parent_dir}: no {ADAPTER_CARD} there, not a flywheel adapter; give "
                          "'champion' or an adapter directory (<home>/adapters/<key>; one trained elsewhere: "
                          "`flywheel adapters import` it first)")
    parent_card = read_card(parent_dir)
    state_dict, metadata = read_saved_adapter(parent_dir)
    saved = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    want = dict(r=config.rank, lora_alpha=config.alpha, use_dora=config.use_dora, target_modules=sorted(config.target_modules))
    have = dict(r=saved.get("r"), lora_alpha=saved.get("lora_alpha"), use_dora=bool(saved.get("use_dora", False)),
                target_modules=sorted(saved.get("target_modules") or []))
    if want != have:
        raise ConfigError(f"train.init_adapter {parent_dir}: parent adapter has {have}, this config wants {want}; "
                         "train the child with the parent's method, rank, alpha and target_modules")
    weights = convert_unet_state_dict_to_peft(
        {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    )
    set_training_adapter_weights(transformer, weights, parent_dir)
    return parent_card


# --- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """Everything a resumed run needs besides the config: optimizer, schedule, randomness, history."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    sampler: ClipSampler
    generator: torch.Generator  # noise, sigma, conditioning frames, text dropout
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    lrs: list[float] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "noise_generator": self.generator.get_state(), "sampler": self.sampler.state_dict()}
        if self.generator.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.generator.device)
        return dict(optimizer=self.optimizer.state_dict(), lr_scheduler=self.lr_scheduler.state_dict(), rng=rng,
                    losses=list(self.losses), lrs=list(self.lrs))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.generator.device)
        self.generator.set_state(state["rng"]["noise_generator"])
        self.sampler.load_state_dict(state["rng"]["sampler"])
        self.losses, self.lrs = list(state["losses"]), list(state["lrs"])
        self.step = int(state["step"])


def resume_latest(work_dir: Path, transformer: torch.nn.Module, run: RunState, config_json: dict,
                  world: World = SINGLE) -> None:
    """Load the newest complete checkpoint of `work_dir` (if any) into the adapter and `run`.

    Every rank reads rank 0's choice of checkpoint (a rank that looked later could see a newer one).
    """
    latest = world.broadcast_object(ckpt.latest_checkpoint(work_dir))
    if latest is None:
        return
    weights, state, saved_config = ckpt.load_checkpoint(latest)
    changed = _changed_fields(saved_config, config_json)
    if changed:
        raise ValueError(f"{latest}: checkpoint was written under another config (fields {changed}); "
                         "use a new work_dir or delete the old checkpoints")
    set_training_adapter_weights(transformer, weights, latest)
    run.load_state_dict(state)


def _changed_fields(saved: dict, current: dict) -> list[str]:
    """Config fields that differ, except those that only change speed and memory (flywheel.train.config.SPEED_FIELDS):
    a retry that chose another checkpointing mode (less free memory) still resumes and reuses."""
    return sorted(k for k in set(saved) | set(current) if k not in SPEED_FIELDS and saved.get(k) != current.get(k))


def base_model_record(cache: LatentCache, pipe) -> dict[str, Any]:
    """The base model the adapter belongs to; the cache must have been encoded by the same model."""
    preset = getattr(pipe, "flywheel_preset", None)
    record = {"model_id": cache.meta.get("model_id"), "revision": cache.meta.get("revision")}
    if preset is not None:
        if record["model_id"] is not None and (preset.model_id, preset.revision) != (record["model_id"], record["revision"]):
            raise ValueError(f"{cache.root}: latent cache was encoded with {record['model_id']}@{record['revision']} "
                             f"but the pipeline is {preset.model_id}@{preset.revision}; re-encode the clips with this model")
        record = {"model_id": preset.model_id, "revision": preset.revision, "preset": preset.name, "dtype": preset.dtype}
    return record


def training_data_record(cache: LatentCache, clip_ids: list[str]) -> dict[str, Any]:
    return {
        "cache_key": cache.root.name,
        "cache_index_sha256": hash_file(cache.root / "index.parquet"),
        "cache_meta_sha256": hash_file(cache.root / "cache.json"),
        "num_train_clips": len(clip_ids),
        "height": cache.meta.get("height"),
        "width": cache.meta.get("width"),
        "num_frames": cache.meta.get("num_frames"),
    }


def adapter_card(config: TrainConfig, base_model: dict, training_data: dict, losses: list[float],
                 num_params: int, parent_dir: Path | None, training_mode: TrainingModeChoice | None = None
                 ) -> AdapterCard:
    """What the adapter is. Deterministic given the inputs: no times, no paths, no resume history (and of the
    training mode's choice, not the free memory it was read from)."""
    tail = losses[-FINAL_LOSS_WINDOW:]
    return AdapterCard(
        lineage="continued" if parent_dir is not None else "trained",
        method=config.method, rank=config.rank, alpha=config.alpha, scaling=config.alpha / config.rank,
        target_modules=list(config.target_modules), base_model=base_model, training_data=training_data,
        steps=config.steps, final_loss=sum(tail) / len(tail), last_step_loss=losses[-1], seed=config.seed,
        num_trainable_parameters=num_params,
        parent_adapter=None if parent_dir is None else {"weights_sha256": hash_file(Path(parent_dir) / ADAPTER_WEIGHTS)},
        config=config.model_dump(mode="json"),
        training_mode=None if training_mode is None else training_mode.model_dump(mode="json", exclude={"free_gib"}))


def _write_loss_csv(path: Path, losses: list[float], lrs: list[float]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True), start=1):
            writer.writerow([i, repr(loss), repr(lr)])


def _read_loss_csv(path: Path) -> list[float]:
    with open(path, newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def write_adapter_dir(transformer: torch.nn.Module, final_dir: Path, card: AdapterCard, losses: list[float],
                      lrs: list[float]) -> None:
    """The final adapter directory, filled in a temp dir and renamed into place."""
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_adapter(transformer, tmp, card)
        _write_loss_csv(tmp / "loss.csv", losses, lrs)
        write_loss_plot(losses, tmp / "loss.png",
                        title=f"{card.method} r={card.rank} alpha={card.alpha:g}: flow-matching loss")
        os.rename(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finished_result(adapter_dir: Path, config: TrainConfig) -> TrainResult:
    card = read_card(adapter_dir)
    if _changed_fields(card.config or {}, config.model_dump(mode="json")):
        raise ValueError(f"{adapter_dir}: holds an adapter trained with another config; "
                         "use a new work_dir for a new config (adapters are immutable)")
    return TrainResult(adapter_dir=adapter_dir, card=card.model_dump(mode="json"),
                       losses=_read_loss_csv(adapter_dir / "loss.csv"), resumed_from_step=card.steps)


def train_adapter(
    cache: LatentCache,
    pipe,
    config: TrainConfig,
    work_dir: Path,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one LoRA/DoRA adapter on `pipe.transformer` from `cache`'s train split.

    `work_dir` holds `checkpoint-<step>/` while training (a run resumes from the newest complete one)
    and, at the end, `adapter/` (written atomically): pytorch_lora_weights.safetensors,
    adapter_card.json, loss.csv, loss.png. A finished `work_dir` returns its adapter without training.
    The pipeline is left as it came: no adapter layers, same train/eval mode, caller's RNG untouched.

    Under torchrun every rank calls this with the same arguments (its own pipeline on its own GPU):
    config.batch_size is the global batch, rank 0 alone writes checkpoints and the adapter and reports
    progress, and every rank returns the same result.
    """
    started = time.perf_counter()
    world = current_world()
    world.shard(config.batch_size)  # an indivisible global batch fails here, before any work
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    final_dir = work_dir / ADAPTER_DIR
    if world.broadcast_object((final_dir / ADAPTER_WEIGHTS).is_file()):
        return _finished_result(final_dir, config)
    clip_ids = cache.clip_ids("train")
    if not clip_ids:
        raise ValueError(f"{cache.root}: latent cache has no clips in the 'train' split; nothing to train on")
    base_model = base_model_record(cache, pipe)
    # Speed settings left as None: the fast path on a GPU, its checkpointing chosen from the free memory.
    free, tokens = free_device_memory(pipe.transformer.device, world), tokens_per_gpu(cache, pipe.transformer, config,
                                                                                      clip_ids[0], world)
    training_mode = config.training_mode(pipe.transformer.device, free, tokens)
    config = config.on_device(pipe.transformer.device, free, tokens)
    if world.is_main:
        ckpt.remove_partial_checkpoints(work_dir)

    transformer = pipe.transformer
    device = transformer.device
    was_training = transformer.training
    params = add_training_adapter(transformer, config)
    # The global RNG is forked: nothing in the step draws from it today, but if anything does (a
    # dropout), it is seeded, checkpointed and restored like the run's own generators.
    undo_speedups: Callable[[], None] = lambda: None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + 2)
        try:
            if config.init_adapter is not None:
                init_from_parent(transformer, config.init_adapter, config)
            optimizer, lr_scheduler = build_optimizer_and_scheduler(params, config, device)
            run = RunState(optimizer, lr_scheduler, ClipSampler(clip_ids, seed=config.seed),
                           torch.Generator(device=device).manual_seed(config.seed + 1))
            resume_latest(work_dir, transformer, run, config.model_dump(mode="json"), world)
            resumed_from_step = run.step
            undo_speedups = apply_training_speedups(transformer, config)  # checkpointing / compile (speed.py)
            transformer.train()
            try:
                step_seconds = _train_loop(cache, transformer, params, run, config, work_dir, progress, world)
            except torch.OutOfMemoryError as e:  # the same type (a retry may still get past it), plus what to set
                raise torch.OutOfMemoryError(f"{e}\n{memory_advice(config)}") from e
            # Same on every rank: the logged losses are means over ranks, the weights are in step.
            card = adapter_card(config, base_model, training_data_record(cache, clip_ids), run.losses,
                                sum(p.numel() for p in params), config.init_adapter, training_mode)
            if world.is_main:
                write_adapter_dir(transformer, final_dir, card, run.losses, run.lrs)
            world.barrier()  # the other ranks return once the adapter is in place
        finally:
            undo_speedups()
            remove_adapter(pipe)
            transformer.train(was_training)
    if world.is_main:
        for _, path in ckpt.list_checkpoints(work_dir):  # the adapter is final; optimizer states are dead weight
            shutil.rmtree(path, ignore_errors=True)
    return TrainResult(adapter_dir=final_dir, card=card.model_dump(mode="json"), losses=run.losses,
                       resumed_from_step=resumed_from_step,
                       seconds=time.perf_counter() - started, training_mode=training_mode, step_seconds=step_seconds)


def free_device_memory(device: torch.device, world: World = SINGLE) -> int | None:
    """Free bytes on the training GPU (the least over the ranks under torchrun, so all choose one mode); None on
    a CPU."""
    if device.type != "cuda":
        return None
    return min(world.all_gather_object(torch.cuda.mem_get_info(device)[0]))


def tokens_per_gpu(cache: LatentCache, transformer: torch.nn.Module, config: TrainConfig, clip_id: str,
                   world: World = SINGLE) -> int:
    """DiT tokens one GPU processes per step: latent frames x height x width over the patch size, times the per-GPU
    batch (what the step's activation memory grows with)."""
    _, frames, height, width = cache.load(clip_id).latent.shape
    patch_t, patch_h, patch_w = transformer.config.patch_size
    return (frames // patch_t) * (height // patch_h) * (width // patch_w) * (config.batch_size // world.world_size)


def _train_loop(cache: LatentCache, transformer: torch.nn.Module, params: list[torch.nn.Parameter], run: RunState,
                config: TrainConfig, work_dir: Path, progress: Callable[[dict], None] | None,
                world: World = SINGLE) -> list[float]:
    """Steps until config.steps; returns each step's wall time (the step ends with the loss read back, so on a
    GPU it is the step's own time; the first one includes compiling)."""
    device = transformer.device
    padding_mask = torch.zeros(1, 1, cache.meta["height"], cache.meta["width"], device=device)
    shard = world.shard(config.batch_size)
    bar = None
    if not world.is_main:
        progress = lambda _: None  # noqa: E731  (rank 0 reports for all)
    elif progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=run.step, desc=f"train {config.method} r={config.rank}")
    step_seconds = []
    with torch.enable_grad():
        while run.step < config.steps:
            step_started = time.perf_counter()
            clip_ids = run.sampler.next_batch(config.batch_size)  # the global batch, the same on every rank
            latents, prompt_embeds = load_batch(cache, clip_ids[shard], device)
            stats = training_step(transformer, params, run.optimizer, run.lr_scheduler, latents, prompt_embeds,
                                  padding_mask, run.generator, config, world)
            step_seconds.append(time.perf_counter() - step_started)
            run.step += 1
            run.losses.append(stats["loss"])
            run.lrs.append(stats["lr"])
            if run.step % config.checkpoint_every == 0 and run.step < config.steps:
                if world.is_main:
                    ckpt.save_checkpoint(work_dir, run.step, training_adapter_weights(transformer), run.state_dict(),
                                         config.model_dump(mode="json"), keep=config.keep_checkpoints)
                world.barrier()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
            else:
                progress({"stage": "train", "step": run.step, "steps": config.steps, **stats})
    if bar is not None:
        bar.close()
    return step_seconds
