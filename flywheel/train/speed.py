"""How fast a training step runs: activation checkpointing, regional torch.compile, the fused optimizer.

None of this changes the math of `training_step`; it changes what the DiT keeps in memory and which
kernels run (autocast and fp8 also the precision some products are computed in). The knobs are TrainConfig fields, applied around the transformer by `apply_training_speedups`:

- activation checkpointing per DiT block, through the hook diffusers already calls for every block
  (`transformer.enable_gradient_checkpointing(gradient_checkpointing_func=...)`):
    none      the block runs plainly and autograd keeps everything (fastest, ~130 GiB at 93x432x768);
    full      only the block inputs are kept, the whole block is recomputed in backward (~14-17 GiB);
    selective recomputed like full, except the ops the policy saves: the attention outputs (75% of the
              step's FLOPs are attention, so backward never recomputes it) and, with "attention_matmul",
              the outputs of the large projections as well;
- regional compile: one `torch.compile` of the per-block function, shared by all 28 blocks (the
  blocks have one structure, so Dynamo compiles once and reuses the code). Checkpointing sits inside
  the compiled function, which is how torch.compile supports selective checkpointing;
- AdamW with `fused=True` (one kernel for all adapter tensors) on CUDA;
- autocast (TrainConfig.autocast, `adapter_autocast`): the adapter's tensors are fp32 (diffusers'
  `cast_training_params`), so on a bf16 base peft runs every LoRA product in fp32, casting each
  31k-token activation to fp32 first (0.17 s of a 2.2 s step at 2B in the profile). Under autocast those
  products run in bf16 while the optimizer still updates fp32 weights;
- fp8 (TrainConfig.fp8): the frozen base projections inside the LoRA layers run torchao float8
  matmuls (flywheel.model.fp8.float8_training); the adapter's own matmuls and everything else as before.

The runner functions and policies are module-level singletons: a second training run in the same
process finds the compiled code already cached instead of recompiling.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from flywheel.train.config import TrainConfig
from flywheel.train.schedule import lr_multiplier

# Every SDPA kernel torch may dispatch to (cuDNN is the default on H100/H200; the CPU one in tests).
_ATTENTION_OP_NAMES = (
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_flash_attention_forward",
    "_efficient_attention_forward",
)
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in _ATTENTION_OP_NAMES
                          if hasattr(torch.ops.aten, name))
# _scaled_mm: the float8 matmul of TrainConfig.fp8 (torchao's Float8Linear), arguments ordered like mm's.
MATMUL_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten._scaled_mm.default})
# A projection's output is worth keeping when both its input and output widths are large: that keeps
# to_q/k/v/out and the MLP, and leaves out the rank-r LoRA products and the 256-wide AdaLN bottleneck
# (whose 6144-wide output per token would cost 1.1 GB a block and is cheap to recompute).
LARGE_MATMUL_WIDTH = 512


def save_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective-checkpointing policy: keep attention outputs, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _is_large_matmul(op, args) -> bool:
    if op not in MATMUL_OPS:
        return False
    first, second = (args[1], args[2]) if op is torch.ops.aten.addmm.default else (args[0], args[1])
    return first.shape[-1] >= LARGE_MATMUL_WIDTH and second.shape[-1] >= LARGE_MATMUL_WIDTH


def save_attention_and_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep attention outputs and large projection outputs; recompute the cheap rest."""
    if op in ATTENTION_OPS or _is_large_matmul(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


SELECTIVE_POLICIES = {"attention": save_attention, "attention_matmul": save_attention_and_matmuls}
_SELECTIVE_CONTEXTS = {name: functools.partial(create_selective_checkpoint_contexts, policy)
                       for name, policy in SELECTIVE_POLICIES.items()}


# --- what runs one DiT block (diffusers calls `runner(block, *block_args)` for each block) --------


def run_block(block: torch.nn.Module, *args):
    return block(*args)


def run_block_full_checkpoint(block: torch.nn.Module, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False)


def run_block_saving_attention(block: torch.nn.Module, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXTS["attention"])


def run_block_saving_attention_matmul(block: torch.nn.Module, *args):
    return checkpoint(block.__call__, *args, use_reentrant=False, context_fn=_SELECTIVE_CONTEXTS["attention_matmul"])


_RUNNERS = {
    ("none", None): run_block,
    ("full", None): run_block_full_checkpoint,
    ("selective", "attention"): run_block_saving_attention,
    ("selective", "attention_matmul"): run_block_saving_attention_matmul,
}


@functools.cache
def block_runner(checkpointing: str, selective_save: str | None = None, compile_backend: str | None = None) -> Callable:
    """The function that runs one block: checkpointing mode, optionally compiled (one compile for all blocks)."""
    key = (checkpointing, selective_save if checkpointing == "selective" else None)
    if key not in _RUNNERS:
        raise ValueError(f"no block runner for activation checkpointing {checkpointing!r} / save {selective_save!r}; "
                         f"use one of {sorted(_RUNNERS, key=str)}")
    runner = _RUNNERS[key]
    if not compile_backend:
        return runner
    # peft's DoRA layer clears its (empty, training-mode) cache dict in forward. Inside a checkpoint
    # Dynamo refuses such a side effect (it would not be replayed in the recompute) and falls back to
    # eager for the whole block; skipping the replay of that no-op keeps DoRA compiled.
    allow_side_effects = torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)
    return allow_side_effects(torch.compile(runner, backend=compile_backend))


def apply_training_speedups(transformer: torch.nn.Module, config: TrainConfig) -> Callable[[], None]:
    """Install the config's fp8 / checkpointing / compile on `transformer`; returns the function that undoes it.

    Call it after the adapter is added (fp8 converts the adapter's base layers). Plain eager without
    checkpointing or fp8 installs nothing. Otherwise the runner goes into diffusers' per-block
    gradient-checkpointing hook, which diffusers only calls when grad is enabled: evaluation under
    no_grad runs the blocks as before (with fp8, in float8).
    """
    undo_steps: list[Callable[[], None]] = []

    def undo() -> None:
        while undo_steps:
            undo_steps.pop()()

    config = config.on_device(next(transformer.parameters()).device)
    try:
        if config.fp8:
            from flywheel.model.fp8 import float8_training

            undo_steps.append(float8_training(transformer))
        mode = config.activation_checkpointing  # concrete after on_device
        backend = config.compile_backend if config.compile else None
        if mode != "none" or backend is not None:
            transformer.enable_gradient_checkpointing(
                gradient_checkpointing_func=block_runner(mode, config.selective_save, backend))
            undo_steps.append(transformer.disable_gradient_checkpointing)
    except BaseException:
        undo()
        raise
    return undo


def memory_advice(config: TrainConfig) -> str:
    """What to change when a training step runs out of GPU memory, most memory saved per speed lost first.

    Peaks measured at the 2B recipe shape (93x432x768, batch 1) on an H200 (benchmarks/): selective
    checkpointing keeping attention and large projections 53 GiB, attention only 20.6 GiB, full
    checkpointing less again; no checkpointing about 130 GiB.
    """
    config = config.on_device("cuda")
    steps = []
    if config.activation_checkpointing == "none":
        steps.append("train.activation_checkpointing: selective (about 53 GiB at the 2B recipe shape, vs ~130 without)")
    if config.activation_checkpointing == "selective" and config.selective_save == "attention_matmul":
        steps.append("train.selective_save: attention (20.6 GiB at the 2B recipe shape, about 6% slower)")
    if config.activation_checkpointing == "selective":
        steps.append("train.activation_checkpointing: full (recomputes each block, lowest memory)")
    if config.batch_size > 1:
        steps.append(f"fewer clips per GPU: a smaller train.batch_size (now {config.batch_size}), or more GPUs "
                     "(FLYWHEEL_GPUS_PER_STEP: the global batch is split over them)")
    if not steps:
        steps.append("shorter or smaller clips (clips.num_frames, clips.height, clips.width), or a GPU with more memory")
    return "The training step ran out of GPU memory. To need less, set " + "; or ".join(steps) + "."


def adapter_autocast(transformer: torch.nn.Module, config: TrainConfig) -> contextlib.AbstractContextManager:
    """Where the forward runs its fp32 adapter in the base's half precision: torch.autocast, else nothing."""
    if not config.autocast or transformer.dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(transformer.device.type, dtype=transformer.dtype)


def use_fused_optimizer(config: TrainConfig, device: torch.device) -> bool:
    return config.fused_optimizer if config.fused_optimizer is not None else device.type == "cuda"


def build_optimizer_and_scheduler(params: list[torch.nn.Parameter], config: TrainConfig, device: torch.device
                                  ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's AdamW + LR schedule (as flywheel.train.schedule), fused where the config/device says."""
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=use_fused_optimizer(config, device) or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lr_multiplier(config))
    return optimizer, scheduler


# --- regional compile for inference (the fast sampler) ----------------------------------------


@functools.cache
def compiled_forward(block_class: type, backend: str) -> Callable:
    """One torch.compile of a block class's forward function, shared by every block and every entry."""
    return torch.compile(block_class.forward, backend=backend)


class RegionalCompile:
    """Context manager: each DiT block's forward compiled (one compiled function for all blocks) inside, eager after.

    For no-grad forwards, where diffusers calls the blocks directly. The compiled function replaces the
    block's `forward` (an instance attribute, removed on exit), not `nn.Module.__call__`: hooks that
    wrap `forward` afterwards (the step cache, flywheel.generate.step_cache) then run eagerly around
    compiled block code, instead of being traced into it (their Python state would make Dynamo
    recompile per block and per cache decision). Leaving restores the eager blocks, so a later
    training run or stock call sees the model as it was; entering again reuses Dynamo's cached code.
    """

    def __init__(self, transformer: torch.nn.Module, backend: str = "inductor"):
        self.blocks = list(transformer.transformer_blocks)
        self.backend = backend

    def __enter__(self):
        replaced = [i for i, block in enumerate(self.blocks) if "forward" in vars(block)]
        if replaced:
            raise RuntimeError(f"DiT blocks {replaced} already have their forward replaced (by a hook?); "
                               "enter RegionalCompile before installing forward hooks")
        for block in self.blocks:
            block.forward = types.MethodType(compiled_forward(type(block), self.backend), block)
        return self

    def __exit__(self, *exc):
        for block in self.blocks:
            vars(block).pop("forward", None)
        return False
