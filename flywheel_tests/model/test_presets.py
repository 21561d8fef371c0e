"""Model presets: the tiny preset is the real Cosmos Predict 2.5 pipeline at toy size."""

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    Cosmos2_5_PredictBasePipeline,
    CosmosTransformer3DModel,
    UniPCMultistepScheduler,
)
from transformers import Qwen2_5_VLForConditionalGeneration

from flywheel.model.presets import get_preset, load_pipeline
from flywheel.model.safety import PassThroughSafetyChecker


def test_tiny_uses_the_exact_cosmos_2_5_classes(tiny_pipe):
    assert isinstance(tiny_pipe, Cosmos2_5_PredictBasePipeline)
    assert isinstance(tiny_pipe.transformer, CosmosTransformer3DModel)
    assert tiny_pipe.transformer.config.use_crossattn_projection
    assert isinstance(tiny_pipe.vae, AutoencoderKLWan)
    assert isinstance(tiny_pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(tiny_pipe.scheduler, UniPCMultistepScheduler)
    assert tiny_pipe.scheduler.config.use_flow_sigmas and tiny_pipe.scheduler.config.prediction_type == "flow_prediction"
    assert tiny_pipe.flywheel_safety["safety_checker"] == "pass-through"


def test_text_embeddings_concatenate_all_hidden_layers(tiny_pipe):
    embeds = tiny_pipe._get_prompt_embeds("push the block", max_sequence_length=64)
    layers = tiny_pipe.text_encoder.config.text_config.num_hidden_layers
    hidden = tiny_pipe.text_encoder.config.text_config.hidden_size
    assert embeds.shape == (1, 64, layers * hidden)
    assert embeds.shape[-1] == tiny_pipe.transformer.config.crossattn_proj_in_channels


def test_tiny_generates_17_frames_at_64px_and_is_seeded(tiny_pipe):
    from PIL import Image

    image = Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8))
    kwargs = dict(image=image, prompt="push the block", num_frames=17, height=64, width=64, num_inference_steps=2,
                  max_sequence_length=64, output_type="np")
    a = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    b = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    c = tiny_pipe(**kwargs, generator=torch.Generator().manual_seed(1)).frames
    assert a.shape == (1, 17, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_tiny_weights_are_built_from_the_seed():
    a = load_pipeline("tiny", seed=3).transformer.state_dict()
    b = load_pipeline("tiny", seed=3).transformer.state_dict()
    c = load_pipeline("tiny", seed=4).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_released_weights_need_a_safety_checker_or_an_explicit_opt_out():
    from flywheel.model.safety import guardrail_available, resolve_safety_checker

    preset = get_preset("cosmos-predict2.5-2b")
    if not guardrail_available():
        with pytest.raises(RuntimeError, match="cosmos_guardrail"):
            resolve_safety_checker(preset, "auto")
    checker, record = resolve_safety_checker(preset, "opt-out")
    assert isinstance(checker, PassThroughSafetyChecker)
    assert record == {"safety_checker": "pass-through", "safety_opt_out": "explicit"}


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*tiny"):
        get_preset("nope")


def test_a_local_model_loads_vae_only_for_a_codec_roundtrip(tiny_pipe, tmp_path):
    """Filter calibration through the model's VAE must not load a 7B text encoder: diffusers skips the
    components given as None. A saved tiny pipeline stands in for a local diffusers directory."""
    from flywheel.model.encode import codec_roundtrip

    torch.set_num_threads(1)
    tiny_pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    pipe = load_pipeline(str(tmp_path / "model"), device="cpu", safety="opt-out", vae_only=True)
    assert pipe.transformer is None and pipe.text_encoder is None
    assert isinstance(pipe.vae, AutoencoderKLWan) and pipe.flywheel_preset.name == "local"
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    out = codec_roundtrip(pipe, frames)
    assert out.shape == frames.shape and out.dtype == np.uint8


FP32_WARNING = "should be kept in float32"


@pytest.mark.parametrize("preset", ["tiny", "tiny-pusht"])
def test_loading_a_preset_prints_no_float32_warning(preset, capfd):
    """diffusers warns on every `.to(dtype)` of a model with float32-only modules; presets cast without it."""
    load_pipeline(preset, device="cpu")
    captured = capfd.readouterr()
    assert FP32_WARNING not in captured.err + captured.out


def test_a_bfloat16_preset_keeps_the_float32_modules_in_float32():
    """As `from_pretrained(torch_dtype=torch.bfloat16)` does: everything bf16 except `_keep_in_fp32_modules`."""
    from flywheel.model.presets import TINY_TRANSFORMER, _cast

    model = CosmosTransformer3DModel(**{**TINY_TRANSFORMER, "extra_pos_embed_type": "learnable"})
    assert model._keep_in_fp32_modules == ["learnable_pos_embed"] and model.learnable_pos_embed is not None
    _cast(model, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    kept = {n for n in dtypes if n.startswith("learnable_pos_embed.")}
    assert kept and all(dtypes[n] == torch.float32 for n in kept)
    assert {dtypes[n] for n in dtypes if n not in kept} == {torch.bfloat16}
