"""FP8 matmuls for the DiT's large projections, through torchao (opt-in: GenerateConfig.fp8, TrainConfig.fp8).

Two torchao workflows, each applied for a while and undone exactly:

- inference (`float8_inference`): `quantize_` with `Float8DynamicActivationFloat8WeightConfig(PerRow())`
  on the large Linear layers of the DiT blocks: weights quantized to float8 per output row once on
  entry, activations per token at run time, one scaled float8 matmul per projection. The bf16
  weight Parameters are kept aside and put back on exit (bit-identical; nothing is dequantized).
  A fused LoRA adapter is simply part of those weights; an unfused one keeps its A/B in high precision.
- training (`float8_training`): the frozen base Linear inside each peft LoRA layer (`base_layer`)
  swapped for torchao's `Float8Linear` (`convert_to_float8_training`, tensorwise dynamic scaling of
  input, weight and grad_output). The LoRA A/B matmuls stay in their own precision, so the trained
  tensors are unchanged in kind. `Float8Linear` shares the original weight Parameter (frozen,
  requires_grad False: its backward still forms grad_weight, which autograd drops; under
  torch.compile the unused matmul is removed from the backward graph). The original modules are put
  back by the returned undo function.

Small layers stay in bf16: a float8 matmul needs both widths divisible by 16, and below ~512 the
casts cost more than the matmul saves (the AdaLN bottleneck, the rank-r LoRA products).

torchao is not a flywheel dependency: it is imported only when asked, and a missing package or a GPU
without float8 tensor cores (CUDA compute capability < 8.9) is a clear error naming the config field.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator

import torch

MIN_FEATURES = 512
MIN_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell: float8 tensor cores
INSTALL = "`pip install torchao`, tested with 0.18.0"
BLOCKS_PREFIX = "transformer_blocks."


class Fp8Unavailable(RuntimeError):
    """FP8 was asked for where it cannot run (no torchao, or no CUDA GPU with float8 tensor cores)."""


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why float8 matmuls cannot run on `device` (None: they can)."""
    device = torch.device(device)
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA GPU with compute capability >= 8.9 (the model is on {device.type})")
    elif torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        problems.append(f"a CUDA GPU with compute capability >= 8.9 ({torch.cuda.get_device_name(device)} "
                        f"has {major}.{minor})")
    if importlib.util.find_spec("torchao") is None:
        problems.append("torchao (not installed)")
    return " and ".join(problems) or None


def require_fp8(device: torch.device | str, field: str) -> None:
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        raise Fp8Unavailable(f"{field}=True needs {reason}: run on such a GPU with torchao installed ({INSTALL}), "
                             f"or set {field}=False")


def is_large_linear(module: torch.nn.Module, min_features: int = MIN_FEATURES) -> bool:
    """A Linear worth a float8 matmul: both widths >= min_features and divisible by 16."""
    if not isinstance(module, torch.nn.Linear):
        return False
    widths = (module.in_features, module.out_features)
    return min(widths) >= min_features and all(w % 16 == 0 for w in widths)


def _unmerged_dora_base_layers(transformer: torch.nn.Module) -> set[int]:
    """ids of base layers whose active DoRA adapter is not merged: DoRA reads their weight as a plain tensor."""
    from peft.tuners.lora import LoraLayer

    skip = set()
    for module in transformer.modules():
        if isinstance(module, LoraLayer) and not module.merged and any(
                module.use_dora.get(name, False) for name in module.active_adapters):
            skip.add(id(module.get_base_layer()))
    return skip


def inference_targets(transformer: torch.nn.Module, min_features: int = MIN_FEATURES) -> dict[str, torch.nn.Linear]:
    """The DiT blocks' large Linear layers by name (LoRA A/B excluded), in module order."""
    skip = _unmerged_dora_base_layers(transformer) if getattr(transformer, "peft_config", None) else set()
    return {name: module for name, module in transformer.named_modules()
            if name.startswith(BLOCKS_PREFIX) and "lora_" not in name and id(module) not in skip
            and is_large_linear(module, min_features)}


@contextlib.contextmanager
def float8_inference(transformer: torch.nn.Module, *, min_features: int = MIN_FEATURES,
                     field: str = "GenerateConfig.fp8") -> Iterator[int]:
    """Inside: the DiT blocks' large projections run float8 matmuls (yields how many); exact bf16 weights after."""
    require_fp8(transformer.device, field)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    targets = inference_targets(transformer, min_features)
    if not targets:
        raise ValueError(f"{field}: the transformer has no Linear layer with both widths >= {min_features} "
                         "(and divisible by 16) in its blocks; nothing to run in float8")
    saved = {name: module.weight for name, module in targets.items()}
    # set_inductor_config=False: torchao would otherwise switch Inductor to coordinate-descent tuning
    # for the whole process (minutes more compile time), a global side effect of one sampling loop.
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    try:
        quantize_(transformer, config, filter_fn=lambda module, name: name in targets)
        yield len(targets)
    finally:
        for name, module in targets.items():
            module.weight = saved[name]
            module.__dict__.pop("extra_repr", None)  # quantize_ sets a per-instance repr naming the quantized weight


def training_targets(transformer: torch.nn.Module, min_features: int = MIN_FEATURES) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers whose frozen `base_layer` is a large Linear, by name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in transformer.named_modules()
            if isinstance(module, LoraLayer) and type(module.base_layer) is torch.nn.Linear
            and is_large_linear(module.base_layer, min_features)}


def float8_training(transformer: torch.nn.Module, *, min_features: int = MIN_FEATURES, emulate: bool = False,
                    field: str = "TrainConfig.fp8") -> Callable[[], None]:
    """Swap the LoRA layers' frozen base Linears for torchao Float8Linear; returns the function that swaps back.

    `emulate=True` is torchao's float8 emulation (casts, then fp32 matmuls): the same module swap and
    autograd on a CPU, for checking the wiring, never for speed.
    """
    if emulate:
        if importlib.util.find_spec("torchao") is None:
            raise Fp8Unavailable(f"{field}=True needs torchao (not installed; {INSTALL}), or set {field}=False")
    else:
        require_fp8(transformer.device, field)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    layers = training_targets(transformer, min_features)
    if not layers:
        raise ValueError(f"{field}: no LoRA layer with a Linear base of both widths >= {min_features} found; "
                         "add the adapter first (flywheel.train.lora.add_training_adapter)")
    originals = {name: layer.base_layer for name, layer in layers.items()}
    base_names = {f"{name}.base_layer" for name in layers}

    def undo() -> None:
        for name, layer in layers.items():
            layer.base_layer = originals[name]

    try:
        convert_to_float8_training(transformer, module_filter_fn=lambda module, name: name in base_names,
                                   config=Float8LinearConfig(emulate=emulate))
    except BaseException:
        undo()
        raise
    return undo
