"""TrainConfig.fp8: the LoRA layers' frozen base projections as torchao float8 matmuls.

torchao is optional and needs a CUDA GPU with compute capability >= 8.9, so on this CPU the knob must
be a clear error that names the field and how to install torchao, and must leave the transformer as
it was (no module swapped, no checkpointing hook installed). What would be converted (the large base
Linears inside the adapter's layers, never the adapter's A/B) and how the selective-checkpointing
policy treats the float8 matmul are checked here too; the conversion itself runs on the GPU benchmark.
"""

from __future__ import annotations

import pytest
import torch

from flywheel.model.fp8 import Fp8Unavailable, fp8_unavailable_reason, training_targets
from flywheel.train import TrainConfig
from flywheel.train.lora import add_training_adapter
from flywheel.train.speed import apply_training_speedups, save_attention, save_attention_and_matmuls
from torch.utils.checkpoint import CheckpointPolicy


@pytest.fixture(scope="module")
def adapted():
    from diffusers import CosmosTransformer3DModel

    from flywheel.model.presets import TINY_TRANSFORMER

    torch.set_num_threads(1)
    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    add_training_adapter(transformer, TrainConfig(rank=4, alpha=4))
    return transformer


def test_fp8_training_on_this_cpu_is_a_clear_error_and_changes_nothing(adapted):
    modules = dict(adapted.named_modules())
    config = TrainConfig(rank=4, alpha=4, fp8=True, activation_checkpointing="selective")
    with pytest.raises(Fp8Unavailable, match=r"TrainConfig\.fp8=True needs .*CUDA GPU with compute capability >= 8\.9"
                                             r".*pip install torchao.*set TrainConfig\.fp8=False"):
        apply_training_speedups(adapted, config)
    assert dict(adapted.named_modules()) == modules, "no module may be swapped"
    assert not adapted.gradient_checkpointing, "nothing else may be installed either"
    assert "cpu" in fp8_unavailable_reason("cpu")


def test_fp8_training_targets_are_the_adapters_large_base_layers(adapted):
    assert training_targets(adapted) == {}, "the tiny DiT (32 wide) has no layer worth a float8 matmul"
    targets = training_targets(adapted, min_features=16)
    assert targets and all(name.startswith("transformer_blocks.") for name in targets)
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"} <= set(targets)
    assert all(type(layer.base_layer) is torch.nn.Linear for layer in targets.values())
    assert not any("lora_" in name for name in targets)


def test_selective_policy_keeps_large_float8_matmul_outputs():
    scaled_mm = torch.ops.aten._scaled_mm.default
    large, small = torch.empty(8, 2048), torch.empty(2048, 32)
    assert save_attention_and_matmuls(None, scaled_mm, large, torch.empty(2048, 2048)) == CheckpointPolicy.MUST_SAVE
    assert save_attention_and_matmuls(None, scaled_mm, large, small) == CheckpointPolicy.PREFER_RECOMPUTE
    assert save_attention(None, scaled_mm, large, torch.empty(2048, 2048)) == CheckpointPolicy.PREFER_RECOMPUTE


def test_config_default_is_off():
    assert TrainConfig().fp8 is False
