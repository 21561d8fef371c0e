"""The fast sampler's opt-in speed means that change the numbers: step caching and float8 matmuls.

Step cache (diffusers' First Block Cache on the Cosmos DiT, tiny preset, fp32, CPU): installed with a
threshold that never skips it reproduces the uncached video exactly; a positive threshold really
skips the later blocks (counted) at one decision per step for the batched cond+uncond forward and
stays close to the uncached video; it composes with the regional compile (one graph, no break);
the hooks are gone afterwards. FP8 needs torchao and a CUDA GPU with compute capability >= 8.9: on
this CPU it is a clear error that names the config field and leaves the model untouched.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flywheel.generate.config import GenerateConfig
from flywheel.generate.sampler import sample_image_to_world
from flywheel.generate.world import unload_adapters
from flywheel.model.fp8 import Fp8Unavailable, inference_targets, is_large_linear
from flywheel.model.presets import PRESETS

SIZE, FRAMES, STEPS = 64, 17, 8
THRESHOLD = 0.05
MIN_PSNR_DB = 40.0  # cached vs uncached, tiny preset at THRESHOLD, 8 steps (measured: 80 dB, 3 of 8 steps skipped)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    torch.set_num_threads(1)
    unload_adapters(tiny_pipe)
    return tiny_pipe


@pytest.fixture(scope="module")
def image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    return Image.fromarray(np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8))


@pytest.fixture(scope="module")
def embeds(pipe):
    with torch.no_grad():
        return pipe.encode_prompt("Pick up the yellow bottle.", negative_prompt="blurry, static",
                                  do_classifier_free_guidance=True, max_sequence_length=64, device=torch.device("cpu"))


def sample(pipe, image, embeds, **speed) -> np.ndarray:
    return sample_image_to_world(pipe, image, embeds[0], embeds[1], height=SIZE, width=SIZE, num_frames=FRAMES,
                                 num_inference_steps=STEPS, guidance_scale=7.0, output_type="np",
                                 generator=torch.Generator().manual_seed(0), **speed).frames


@pytest.fixture(scope="module")
def uncached(pipe, image, embeds) -> np.ndarray:
    return sample(pipe, image, embeds)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class BlockComputeCounter:
    """Counts, per DiT block, the forwards that really compute (the block's self-attention runs)."""

    def __init__(self, transformer):
        self.calls = [0] * len(transformer.transformer_blocks)
        self.handles = [block.attn1.register_forward_pre_hook(self._hook(i))
                        for i, block in enumerate(transformer.transformer_blocks)]

    def _hook(self, index):
        def count(module, args):
            self.calls[index] += 1
        return count

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def assert_no_hooks_left(transformer):
    assert not hasattr(transformer, "_diffusers_hook")
    for block in transformer.transformer_blocks:
        assert not hasattr(block, "_diffusers_hook") and "forward" not in vars(block), "the block must be as before"


def test_a_cache_that_never_skips_reproduces_the_uncached_video_exactly(pipe, image, embeds, uncached):
    with BlockComputeCounter(pipe.transformer) as counter:
        frames = sample(pipe, image, embeds, step_cache_threshold=0.0)
    np.testing.assert_array_equal(frames, uncached)
    stats = pipe.flywheel_last_step_cache
    assert stats["steps"] == STEPS and stats["skipped_steps"] == 0
    assert counter.calls == [STEPS] * len(pipe.transformer.transformer_blocks)
    # The recorded changes are First Block Cache's decision values: positive, and the first step has none.
    assert stats["changes"][0] is None and all(c > 0 for c in stats["changes"][1:])
    assert_no_hooks_left(pipe.transformer)


def test_a_positive_threshold_skips_blocks_and_stays_close(pipe, image, embeds, uncached):
    with BlockComputeCounter(pipe.transformer) as counter:
        frames = sample(pipe, image, embeds, step_cache_threshold=THRESHOLD)
    stats = pipe.flywheel_last_step_cache
    # One decision per denoising step: cond and uncond are one batch-2 forward, never two cache calls.
    assert stats["steps"] == STEPS and len(stats["computed"]) == STEPS
    assert 0 < stats["skipped_steps"] < STEPS - 1, stats
    assert stats["computed"][0], "the first step has nothing to reuse"
    assert counter.calls[0] == STEPS, "block 0 decides, so it runs at every step"
    assert counter.calls[1:] == [stats["computed_steps"]] * (len(counter.calls) - 1)
    computed_changes = [c for c, done in zip(stats["changes"], stats["computed"], strict=True) if done and c is not None]
    assert all(c > THRESHOLD for c in computed_changes), "a step is only computed when block 0 changed enough"
    assert psnr_db(frames, uncached) >= MIN_PSNR_DB
    assert not np.array_equal(frames, uncached), "skipped steps reuse residuals: not bit-identical"
    assert_no_hooks_left(pipe.transformer)
    np.testing.assert_array_equal(sample(pipe, image, embeds), uncached)  # later uncached calls are unaffected
    assert pipe.flywheel_last_step_cache is None


def test_step_cache_composes_with_the_regional_compile(pipe, image, embeds):
    """The hooks run eagerly around the compiled block forward: one graph for all blocks, no break, same video."""
    from torch._dynamo.utils import counters

    eager = sample(pipe, image, embeds, step_cache_threshold=THRESHOLD)
    eager_stats = pipe.flywheel_last_step_cache
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = sample(pipe, image, embeds, step_cache_threshold=THRESHOLD, compile=True, compile_backend="aot_eager")
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    assert pipe.flywheel_last_step_cache["computed"] == eager_stats["computed"]
    np.testing.assert_allclose(compiled, eager, atol=1e-4, rtol=0)
    assert_no_hooks_left(pipe.transformer)


def test_fp8_on_this_cpu_is_a_clear_error_and_changes_nothing(pipe, image, embeds):
    weights = dict(pipe.transformer.named_parameters())
    with pytest.raises(Fp8Unavailable, match=r"GenerateConfig\.fp8=True needs .*pip install torchao"):
        sample(pipe, image, embeds, fp8=True)
    after = dict(pipe.transformer.named_parameters())
    assert after.keys() == weights.keys() and all(after[name] is p for name, p in weights.items())


def test_fp8_targets_are_the_blocks_large_projections_never_lora():
    from diffusers import CosmosTransformer3DModel
    from peft import LoraConfig

    from flywheel.model.presets import TINY_TRANSFORMER

    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    # The tiny DiT is 32 wide: nothing reaches the real threshold, everything block-level with 16.
    assert inference_targets(transformer) == {}
    names = set(inference_targets(transformer, min_features=16))
    assert names and all(n.startswith("transformer_blocks.") for n in names)
    assert {"transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"} <= names
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "ff.net.2"]), adapter_name="t")
    with_lora = set(inference_targets(transformer, min_features=16))
    assert "transformer_blocks.0.attn1.to_q.base_layer" in with_lora
    assert not any("lora_" in n for n in with_lora), "the adapter's A/B stay in high precision"
    assert not is_large_linear(torch.nn.Linear(512, 520)) and is_large_linear(torch.nn.Linear(512, 528))


TINY = PRESETS["tiny"]


def test_generate_config_speed_means_need_the_fast_sampler():
    assert GenerateConfig(sampler="fast", fp8=True, step_cache_threshold=0.1).step_cache_threshold == 0.1
    for field in (dict(fp8=True), dict(step_cache_threshold=0.1), dict(compile=True), dict(decode_batch=4)):
        with pytest.raises(ValueError, match="sampler='fast'"):
            GenerateConfig(sampler="stock", **field)
        # Left as None, the sampler is ours when a setting only it has is asked for, on any device.
        assert GenerateConfig(**field).resolved(TINY, "cpu").sampler == "fast"


def test_generate_config_is_the_fast_path_on_a_gpu_and_our_eager_unfused_sampler_on_a_cpu():
    gpu, cpu = GenerateConfig().resolved(TINY, "cuda:1"), GenerateConfig().resolved(TINY, "cpu")
    assert (gpu.sampler, gpu.compile, gpu.fuse_lora) == ("fast", True, True)
    assert (cpu.sampler, cpu.compile, cpu.fuse_lora) == ("fast", False, False)
    assert gpu.step_cache_threshold is None and not gpu.fp8, "settings that change the frames stay opt-in"
    kept = GenerateConfig(sampler="stock", fuse_lora=False).resolved(TINY, "cuda")
    assert (kept.sampler, kept.compile, kept.fuse_lora) == ("stock", False, False), "explicit settings are kept"
    assert GenerateConfig().resolved(TINY).sampler is None, "without a device only the preset's values are filled"
    with pytest.raises(ValueError, match="step_cache_threshold"):
        GenerateConfig(sampler="fast", step_cache_threshold=-0.1)
