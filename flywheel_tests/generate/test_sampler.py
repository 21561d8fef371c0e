"""The fast image-to-world sampler computes the stock pipeline call's video (tiny preset, fp32, CPU).

Same seed / latents in, same frames out: with and without guidance, with a LoRA adapter, with the
adapter fused into the base weights (which are bit-identical again afterwards), and with the DiT
blocks compiled. generate_videos routes to it with GenerateConfig(sampler="fast").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flywheel.generate.config import GenerateConfig
from flywheel.generate.sampler import encode_first_frame, fused_lora, sample_image_to_world
from flywheel.generate.world import GenerationRequest, generate_videos, load_adapters, unload_adapters, use_adapter

PROMPT = "Pick up the yellow bottle on the table."
SIZE, FRAMES, STEPS = 64, 17, 3
ATOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    torch.set_num_threads(1)
    unload_adapters(tiny_pipe)
    yield tiny_pipe
    unload_adapters(tiny_pipe)


@pytest.fixture(scope="module")
def image() -> Image.Image:
    """A structured (not noise) first frame at another size than the output: the resize path is exercised."""
    y, x = np.mgrid[0:48, 0:80]
    frame = np.stack([(x * 3) % 256, (y * 5) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(frame)


@pytest.fixture(scope="module")
def embeds(pipe):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPT, negative_prompt="blurry, static", do_classifier_free_guidance=True,
                                  max_sequence_length=64, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def adapter(pipe, tmp_path_factory) -> Path:
    """A LoRA with non-zero B on every projection, saved the diffusers way."""
    from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from flywheel.model.presets import TINY_TRANSFORMER

    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    torch.manual_seed(5)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]))
    root = tmp_path_factory.mktemp("lora") / "a"
    Cosmos2_5_PredictBasePipeline.save_lora_weights(
        root, transformer_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer)))
    return root


def settings(guidance_scale: float = 7.0, output_type: str = "np") -> dict:
    return dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance_scale,
                conditional_frame_timestep=1e-4, output_type=output_type)


def stock(pipe, image, embeds, seed=0, **kw):
    return pipe(image=image, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], max_sequence_length=64,
                generator=torch.Generator().manual_seed(seed), **settings(**kw)).frames


def fast(pipe, image, embeds, seed=0, **kw):
    compile = kw.pop("compile", False)
    return sample_image_to_world(pipe, image, embeds[0], embeds[1], generator=torch.Generator().manual_seed(seed),
                                 compile=compile, compile_backend="aot_eager", **settings(**kw)).frames


def assert_frames_close(got, want):
    assert type(got) is type(want) and got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("guidance_scale", [7.0, 1.0])
def test_fast_sampler_gives_the_stock_frames(pipe, image, embeds, guidance_scale):
    assert_frames_close(fast(pipe, image, embeds, guidance_scale=guidance_scale),
                        stock(pipe, image, embeds, guidance_scale=guidance_scale))
    # The latents agree too, and they are sensitive: guidance and the seed each move them far beyond ATOL.
    latents = fast(pipe, image, embeds, guidance_scale=guidance_scale, output_type="latent")
    torch.testing.assert_close(latents, stock(pipe, image, embeds, guidance_scale=guidance_scale, output_type="latent"),
                               atol=ATOL, rtol=0)
    other_guidance = fast(pipe, image, embeds, guidance_scale=4.0 if guidance_scale == 1.0 else 1.0, output_type="latent")
    assert (latents - other_guidance).abs().max() > 100 * ATOL
    assert (latents - fast(pipe, image, embeds, seed=1, guidance_scale=guidance_scale, output_type="latent")).abs().max() > 0.1


def test_first_frame_encode_equals_the_stock_conditioning_latent(pipe, image):
    """The stock call encodes the frame plus 16 blank frames; only latent frame 0 is kept (the VAE is causal)."""
    import torchvision

    frame = torchvision.transforms.functional.to_tensor(image).unsqueeze(0)
    with torch.no_grad():  # what prepare_latents encodes: the frame, then blanks, preprocessed together
        stock_video = pipe.video_processor.preprocess_video(
            torch.cat([frame, torch.zeros_like(frame).repeat(FRAMES - 1, 1, 1, 1)]).unsqueeze(0), SIZE, SIZE)
        stock_latent = (pipe.vae.encode(stock_video).latent_dist.mode() - pipe.latents_mean) * pipe.latents_std
        ours = encode_first_frame(pipe, image, SIZE, SIZE, stock_latent.shape[2], torch.device("cpu"))
    assert stock_video.shape[2] == FRAMES and ours.shape == stock_latent.shape
    torch.testing.assert_close(ours[:, :, :1], stock_latent[:, :, :1], atol=1e-5, rtol=0)
    assert (stock_latent[:, :, 1:] - stock_latent[:, :, :1]).abs().max() > 0.1, "later latents differ, and are unused"
    assert ours[:, :, 1:].abs().max() == 0


def test_fast_sampler_with_a_lora_adapter_plain_and_fused(pipe, image, embeds, adapter):
    base = stock(pipe, image, embeds, output_type="latent")
    load_adapters(pipe, {"a": adapter})
    try:
        use_adapter(pipe, "a")
        want = stock(pipe, image, embeds)
        want_latents = stock(pipe, image, embeds, output_type="latent")
        assert (want_latents - base).abs().max() > 0.05, "the adapter must change the rollout"
        assert_frames_close(fast(pipe, image, embeds), want)

        weights = {name: p.detach().clone() for name, p in pipe.transformer.named_parameters()}
        with fused_lora(pipe, "a"):
            fused_weight = pipe.transformer.transformer_blocks[0].attn1.to_q.base_layer.weight
            assert not torch.equal(fused_weight, weights["transformer_blocks.0.attn1.to_q.base_layer.weight"])
            assert_frames_close(fast(pipe, image, embeds), want)
        after = dict(pipe.transformer.named_parameters())
        assert after.keys() == weights.keys()
        assert all(torch.equal(after[name], w) for name, w in weights.items()), "base weights must be restored exactly"
        torch.testing.assert_close(stock(pipe, image, embeds, output_type="latent"), want_latents, atol=0, rtol=0)
    finally:
        unload_adapters(pipe)


def test_compiled_fast_sampler_gives_the_stock_frames_and_leaves_blocks_eager(pipe, image, embeds):
    assert_frames_close(fast(pipe, image, embeds, compile=True), stock(pipe, image, embeds))
    assert all(block._compiled_call_impl is None for block in pipe.transformer.transformer_blocks)


def test_generate_videos_with_the_fast_sampler_and_fused_lora(pipe, image, adapter, tmp_path):
    from flywheel.data.video import read_frames

    frame = np.asarray(image.resize((SIZE, SIZE)))
    requests = [GenerationRequest("base", frame, PROMPT, seed=0), GenerationRequest("lora", frame, PROMPT, seed=0, adapter="a")]
    config = dict(seeds=[0], num_inference_steps=2)
    runs = {}
    try:
        for name, extra in [("stock", {}), ("fast", dict(sampler="fast")), ("fused", dict(sampler="fast", fuse_lora=True))]:
            runs[name] = generate_videos(pipe, requests, tmp_path / name, GenerateConfig(**config, **extra),
                                         adapters={"a": adapter})
    finally:
        unload_adapters(pipe)
    sha = {name: run.frame["frames_sha256"].tolist() for name, run in runs.items()}
    assert len(set(sha["stock"])) == 2, "base and adapter rollouts must differ"
    assert sha["fast"] == sha["stock"], "the fast sampler must give the stock uint8 frames"
    # Fused weights round differently (W + BA vs Wx + BAx): equal up to a rare uint8 rounding flip.
    assert sha["fused"][0] == sha["stock"][0]
    fused, plain = (read_frames(runs[n].out_dir / "videos" / "lora.mp4").astype(int) for n in ("fused", "stock"))
    assert np.abs(fused - plain).mean() < 0.5
    assert runs["fused"].frame["adapter"].tolist() == ["base", "a"]


def test_bad_inputs_are_refused(pipe, image, embeds):
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sample_image_to_world(pipe, image, embeds[0], None, **settings())
    with pytest.raises(ValueError, match="exactly that adapter active"):
        with fused_lora(pipe, "nothing"):
            pass
    with pytest.raises(ValueError, match="sampler='fast'"):
        GenerateConfig(sampler="stock", compile=True)
