"""What an adapter training run does. Configs are data: this model is the whole recipe.

Defaults follow the public diffusers Cosmos Predict 2.5 LoRA recipe
(examples/cosmos/train_cosmos_predict25_lora.py + optimizer_utils.py): r=32, alpha=32, the attention and
MLP projections of every DiT block, AdamW at 2**-14.5 with weight decay 1e-3, a linear warm-up / linear
decay LR multiplier (1e-6 -> 0.5 -> 0.2), gradient clipping at 1.0, 20% text dropout for CFG, and
1 or 2 clean conditioning latent frames with equal probability.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


# Fields that change how fast a step runs and how much memory it takes, never its result (up to float order).
SPEED_FIELDS = ("gradient_checkpointing", "activation_checkpointing", "selective_save", "compile", "compile_backend",
                "fused_optimizer", "checkpoint_every", "keep_checkpoints")

# Peak GPU memory of one training step (torch.cuda.max_memory_allocated: the bf16 transformer, adapter, optimizer
# state and activations) at the 2B recipe shape, 93x432x768 at batch 1 = 31,104 DiT tokens, LoRA/DoRA r=32, on an
# H200 (benchmarks/results/nvidia-h200.json): regional compile + autocast. Full checkpointing has only an eager run
# without autocast (the compiled one was cut by the time budget): that peak stands in for it. Another rank changes
# the adapter and its optimizer state, well under a GiB at these ranks, which the margin covers.
RECIPE_TOKENS = 31_104
RECIPE_TRANSFORMER_GIB = 3.84  # the 2B DiT's bf16 weights (2.06e9 parameters): resident before the step
MEASURED_STEP_PEAK_GIB: dict[tuple[str, str, str | None], float] = {
    ("lora", "selective", "attention_matmul"): 53.23,
    ("lora", "selective", "attention"): 20.58,
    ("lora", "full", None): 16.6,
    ("dora", "selective", "attention_matmul"): 58.25,
    ("dora", "selective", "attention"): 22.39,
    ("dora", "full", None): 37.13,
}
# What a step may need beyond the estimate: allocator fragmentation, cuDNN workspaces, the CUDA context's growth.
MEMORY_MARGIN_FRACTION = 0.10
MEMORY_MARGIN_GIB = 1.0
GIB = 2**30


class TrainingModeChoice(BaseModel):
    """Which activation checkpointing a run uses and why: recorded in the adapter card."""

    activation_checkpointing: Literal["none", "full", "selective"]
    selective_save: Literal["attention", "attention_matmul"] | None
    chosen_by: str               # "config" | "free GPU memory"
    estimated_step_gib: float | None  # estimated memory the step needs beyond the resident weights
    free_gib: float | None = None
    fits: bool | None = None     # False: nothing fits the estimate; the least memory-hungry mode runs anyway

    @property
    def mode(self) -> tuple[str, str | None]:
        return self.activation_checkpointing, self.selective_save


def estimated_step_gib(method: str, checkpointing: str, selective_save: str | None, tokens_per_gpu: int) -> float:
    """Memory one training step needs beyond the transformer's weights, from the measured 2B peaks: the part
    above the weights (activations, adapter, optimizer state) scales with the DiT tokens of the per-GPU batch
    (attention kernels and projections are linear in sequence length)."""
    peak = MEASURED_STEP_PEAK_GIB[(method, checkpointing, selective_save if checkpointing == "selective" else None)]
    return (peak - RECIPE_TRANSFORMER_GIB) * tokens_per_gpu / RECIPE_TOKENS


def choose_training_mode(config: TrainConfig, free_bytes: int, tokens_per_gpu: int) -> TrainingModeChoice:
    """The fastest checkpointing mode, among those the config leaves open, whose estimated step memory plus a
    margin (10% + 1 GiB) fits `free_bytes`: selective keeping attention and large projections, then selective
    keeping attention (~6% slower), then full checkpointing. If none fits, the one needing least memory (the
    out-of-memory message then says what else to change). A mode the config sets is kept as it is."""
    mode, save = config.activation_checkpointing, config.selective_save
    if mode is None and config.gradient_checkpointing:
        mode = "full"
    free_gib = free_bytes / GIB
    if mode not in (None, "selective") or (mode == "selective" and save is not None):
        return TrainingModeChoice(activation_checkpointing=mode, selective_save=save if mode == "selective" else None,
                                  chosen_by="config", estimated_step_gib=_estimate(config, mode, save, tokens_per_gpu),
                                  free_gib=round(free_gib, 2))
    saves = [save] if save is not None else ["attention_matmul", "attention"]
    candidates = [("selective", s) for s in saves] + ([("full", None)] if mode is None else [])
    estimates = {c: estimated_step_gib(config.method, c[0], c[1], tokens_per_gpu) for c in candidates}
    fitting = [c for c in candidates if estimates[c] * (1 + MEMORY_MARGIN_FRACTION) + MEMORY_MARGIN_GIB <= free_gib]
    chosen = fitting[0] if fitting else min(candidates, key=estimates.__getitem__)
    return TrainingModeChoice(activation_checkpointing=chosen[0], selective_save=chosen[1], chosen_by="free GPU memory",
                              estimated_step_gib=round(estimates[chosen], 2), free_gib=round(free_gib, 2),
                              fits=bool(fitting))


def _estimate(config: TrainConfig, mode: str, save: str | None, tokens_per_gpu: int) -> float | None:
    key = (config.method, mode, save if mode == "selective" else None)
    return round(estimated_step_gib(*key, tokens_per_gpu), 2) if key in MEASURED_STEP_PEAK_GIB else None


class TrainConfig(BaseModel):
    """LoRA / DoRA adapter training settings (one adapter on a frozen Cosmos transformer)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["lora", "dora"] = "lora"
    rank: int = Field(32, gt=0, description="LoRA rank r")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha / rank")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)

    steps: int = Field(1000, gt=0, description="optimizer steps")
    batch_size: int = Field(1, gt=0, description="clips per step (stacked; latents must share a shape)")
    learning_rate: float = Field(2**-14.5, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    warmup_steps: int | None = Field(None, ge=0, description="None: min(2000, steps // 10)")
    cycle_length: int | None = Field(None, gt=0, description="steps of the warm-up + decay cycle; None: steps")
    f_start: float = Field(1e-6, ge=0, description="LR multiplier at step 0")
    f_max: float = Field(0.5, gt=0, description="LR multiplier at the end of warm-up")
    f_min: float = Field(0.2, ge=0, description="LR multiplier at the end of the cycle")
    max_grad_norm: float = Field(1.0, gt=0)

    cfg_dropout: float = Field(0.2, description="probability of zeroing a sample's text embedding (for CFG)")
    conditional_frames_probs: dict[int, float] = Field(default_factory=lambda: {1: 0.5, 2: 0.5})
    conditional_frame_timestep: float = Field(1e-4, description="timestep given to clean conditioning frames; < 0 disables")
    time_shift: float = Field(5.0, gt=0, description="sigma = shift*t / (1 + (shift-1)*t), t = sigmoid(randn)")

    gradient_checkpointing: bool = False  # kept for old configs: True means activation_checkpointing "full"
    activation_checkpointing: Literal["none", "full", "selective"] | None = Field(
        None, description="per DiT block: none (fastest, most memory), full (recompute the block in backward), "
        "selective (recompute all but what selective_save names); None: 'full' if gradient_checkpointing, else on a "
        "CUDA GPU the fastest of selective / full that fits its free memory (see selective_save), 'none' on a CPU")
    selective_save: Literal["attention", "attention_matmul"] | None = Field(
        None, description="what 'selective' keeps from the forward: attention outputs (backward never "
        "recomputes attention; 20.6 GiB at the 2B recipe shape), or those plus the outputs of the large projections "
        "(faster; 53 GiB there). None: on a CUDA GPU, the fastest that fits its free memory with a margin "
        "(attention_matmul, else attention, else full checkpointing when activation_checkpointing is None too), "
        "estimated from those peaks scaled by the clip's tokens; the choice is recorded in the adapter card")
    compile: bool | None = Field(None, description="torch.compile each DiT block once (regional compile) for training; "
                                 "None: on a CUDA GPU, not on a CPU")
    compile_backend: Literal["inductor", "aot_eager"] = Field(
        "inductor", description="inductor: fast kernels (GPU); aot_eager: same graphs without codegen (CPU tests)")
    fused_optimizer: bool | None = Field(None, description="AdamW(fused=True); None: fused on CUDA only")
    autocast: bool = Field(True, description="on a bf16/fp16 base, run the forward under torch.autocast to the "
                           "base's dtype, so the fp32 adapter's matmuls run in bf16 on fp32 master weights (what "
                           "accelerate's mixed precision does); False: they run in fp32. No effect on an fp32 base")
    fp8: bool = Field(False, description="run the frozen base projections of the LoRA layers as torchao float8 "
                      "matmuls (Float8Linear; needs torchao and a CUDA GPU with compute capability >= 8.9); the "
                      "adapter's tensors and matmuls keep their precision")
    checkpoint_every: int = Field(500, gt=0, description="write a resumable checkpoint every N steps")
    keep_checkpoints: int = Field(2, gt=0, description="how many of the newest checkpoints to keep")
    seed: int = Field(0, ge=0)
    init_adapter: Path | None = Field(None, description="adapter dir of a parent adapter to continue from")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if any(not name.strip() for name in v):
            raise ValueError(f"target_modules must be non-empty module names, got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"target_modules has duplicates: {v}")
        return v

    @field_validator("cfg_dropout")
    @classmethod
    def _cfg_dropout(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {v}")
        return v

    @field_validator("conditional_frames_probs")
    @classmethod
    def _cond_probs(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("conditional_frames_probs must not be empty, e.g. {1: 0.5, 2: 0.5}")
        if not set(v) <= {1, 2}:
            raise ValueError(f"conditional_frames_probs keys must be 1 or 2 latent frames, got {sorted(v)}")
        if any(p < 0 for p in v.values()):
            raise ValueError(f"conditional_frames_probs must be >= 0, got {v}")
        if abs(sum(v.values()) - 1.0) > 1e-6:
            raise ValueError(f"conditional_frames_probs must sum to 1, got {sum(v.values())} ({v})")
        return dict(sorted(v.items()))

    @model_validator(mode="after")
    def _schedule(self) -> TrainConfig:
        if self.f_min > self.f_max or self.f_start > self.f_max:
            raise ValueError(f"need f_start <= f_max and f_min <= f_max, got f_start={self.f_start}, "
                             f"f_max={self.f_max}, f_min={self.f_min}")
        if self.warmup_steps is not None and self.warmup_steps >= self.resolved_cycle_length:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < cycle_length "
                             f"({self.resolved_cycle_length}); lower warmup_steps or raise steps")
        return self

    @model_validator(mode="after")
    def _checkpointing(self) -> TrainConfig:
        if self.gradient_checkpointing and self.activation_checkpointing == "none":
            raise ValueError("gradient_checkpointing=True contradicts activation_checkpointing='none'; "
                             "set only activation_checkpointing ('none', 'full' or 'selective')")
        return self

    def on_device(self, device: str | torch.device, free_bytes: int | None = None,
                  tokens_per_gpu: int | None = None) -> TrainConfig:
        """A copy with the speed settings left as None made concrete for `device`: what actually runs.

        On a CUDA GPU the fast path is the default (regional compile, selective checkpointing keeping attention
        and large projections). Given the GPU's free memory (`free_bytes`, read with the transformer already on
        it) and the DiT tokens one GPU trains on per step (`tokens_per_gpu`), the checkpointing left unset is
        `choose_training_mode`'s: the fastest mode whose estimated step memory fits with a margin. On a CPU,
        plain eager.
        """
        cuda = torch.device(device).type == "cuda"
        mode, save = self.activation_checkpointing, self.selective_save
        if mode is None and self.gradient_checkpointing:
            mode = "full"
        if cuda and free_bytes is not None and tokens_per_gpu is not None:
            mode, save = choose_training_mode(self, free_bytes, tokens_per_gpu).mode
        if mode is None:
            mode = "selective" if cuda else "none"
        if mode == "selective" and save is None:
            save = "attention_matmul"
        return self.model_copy(update=dict(activation_checkpointing=mode, selective_save=save,
                                           compile=cuda if self.compile is None else self.compile))

    def training_mode(self, device: str | torch.device, free_bytes: int | None = None,
                      tokens_per_gpu: int | None = None) -> TrainingModeChoice:
        """What `on_device` with the same arguments chose, and why (for the adapter card)."""
        device = torch.device(device)
        if device.type == "cuda" and free_bytes is not None and tokens_per_gpu is not None:
            return choose_training_mode(self, free_bytes, tokens_per_gpu)
        resolved = self.on_device(device)
        mode, save = resolved.activation_checkpointing, resolved.selective_save
        set_by_config = self.activation_checkpointing is not None or self.gradient_checkpointing
        return TrainingModeChoice(
            activation_checkpointing=mode, selective_save=save if mode == "selective" else None,
            chosen_by="config" if set_by_config else f"default on {device.type}",
            estimated_step_gib=_estimate(self, mode, save, tokens_per_gpu) if tokens_per_gpu else None,
            free_gib=round(free_bytes / GIB, 2) if free_bytes is not None else None)

    @property
    def use_dora(self) -> bool:
        return self.method == "dora"

    @property
    def resolved_cycle_length(self) -> int:
        return self.cycle_length if self.cycle_length is not None else self.steps

    @property
    def resolved_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(2000, self.steps // 10)
