"""Our image-to-world sampler: the stock Cosmos Predict 2.5 denoising loop, with less work per video.

Same math as `Cosmos2_5_PredictBasePipeline.__call__` (diffusers 0.42, image-to-world, one video),
on the pipeline's own vae / scheduler / transformer / video_processor, with four changes:

- guidance runs the conditional and unconditional passes as ONE transformer forward of batch 2;
- prompt embeddings come in precomputed (each prompt is encoded once per run, not once per video);
- the first frame alone goes through the VAE. The stock call encodes it followed by num_frames-1
  blank frames, but the Wan VAE is causal in time (latent frame 0 sees pixel frame 0 only) and the
  condition mask keeps only latent frame 0 of the result, so the other 92 frames' encode is waste;
- optional regional torch.compile of the DiT blocks (flywheel.train.speed.RegionalCompile), and
  `fused_lora` to fold the active adapter into the base weights for the duration of a group;
- optional float8 matmuls in the DiT blocks (`fp8`, flywheel.model.fp8.float8_inference: torchao,
  bf16 weights restored after the loop) and step caching (`step_cache_threshold`,
  flywheel.generate.step_cache: diffusers' First Block Cache, hooks removed after the loop). These
  two change the numbers, not only the speed: measure PSNR against the stock call
  (benchmarks/cosmos_predict25.py) before relying on them.

Output: the stock call's `CosmosPipelineOutput` (frames as `output_type` says), so callers swap one
for the other. From the same latents the frames match the stock call's up to float rounding
(batched vs separate matmuls): exact in fp32, small in bf16 (see benchmarks/cosmos_predict25.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from PIL import Image


def _stock_module():
    from diffusers.pipelines.cosmos import pipeline_cosmos2_5_predict

    return pipeline_cosmos2_5_predict


def encode_first_frame(pipe, image: Image.Image, height: int, width: int, num_latent_frames: int,
                       device: torch.device) -> torch.Tensor:
    """The conditioning latent [1, C, T', H', W'] fp32, normalised: the first frame's latent, zeros after it."""
    import torchvision

    frame = torchvision.transforms.functional.to_tensor(image).unsqueeze(0)  # [1, 3, H, W] in [0, 1]
    video = pipe.video_processor.preprocess_video(frame.unsqueeze(0), height, width)  # [1, 3, 1, h, w]
    video = video.to(device=device, dtype=pipe.vae.dtype)
    first = _stock_module().retrieve_latents(pipe.vae.encode(video), sample_mode="argmax").to(torch.float32)
    first = (first - pipe.latents_mean.to(device, torch.float32)) * pipe.latents_std.to(device, torch.float32)
    cond_latent = first.new_zeros(first.shape[0], first.shape[1], num_latent_frames, *first.shape[3:])
    cond_latent[:, :, :1] = first[:, :, :1]
    return cond_latent


def _check_inputs(pipe, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                  guidance: bool, height: int, width: int) -> None:
    if pipe.safety_checker is None:
        raise ValueError("the pipeline has no safety checker; the Cosmos license requires one "
                         "(flywheel.model.presets.load_pipeline sets it up)")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1:
        raise ValueError(f"prompt_embeds must be [1, L, D] (one video per call), got {tuple(prompt_embeds.shape)}")
    if guidance:
        if negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_prompt_embeds (encode the negative prompt once, "
                             "e.g. flywheel.generate.world.PromptEmbeddings.negative)")
        if negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the shape of "
                             f"prompt_embeds {tuple(prompt_embeds.shape)} (same max_sequence_length)")
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")


@torch.no_grad()
def sample_image_to_world(
    pipe,
    image: Image.Image,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor | None = None,
    *,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    conditional_frame_timestep: float = 1e-4,
    output_type: str = "np",
    callback_on_step_end: Callable | None = None,
    compile: bool = False,
    compile_backend: str = "inductor",
    fp8: bool = False,
    step_cache_threshold: float | None = None,
):
    """One image-to-world video; arguments and result as the stock `pipe(image=..., prompt_embeds=...)` call.

    With `step_cache_threshold` set, what the cache did is left in `pipe.flywheel_last_step_cache`
    (StepCacheStats.as_dict(): steps computed / skipped); None there otherwise.
    """
    stock = _stock_module()
    guidance = guidance_scale > 1.0
    _check_inputs(pipe, prompt_embeds, negative_prompt_embeds, guidance, height, width)
    device = pipe._execution_device
    transformer = pipe.transformer
    transformer_dtype = transformer.dtype
    pipe._guidance_scale, pipe._current_timestep, pipe._interrupt = guidance_scale, None, False

    num_latent_frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    shape = (1, transformer.config.in_channels - 1, num_latent_frames,
             height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    cond_latent = encode_first_frame(pipe, image, height, width, num_latent_frames, device)
    # Drawn after the encode, like the stock call (its argmax encode draws nothing from the generator).
    if latents is None:
        latents = stock.randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    else:
        latents = latents.to(device=device, dtype=torch.float32)
    cond_indicator, cond_mask = pipe.create_condition_mask(shape, device, torch.float32, 1)
    padding_mask = latents.new_zeros(1, 1, height, width, dtype=transformer_dtype)

    pipe.scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = pipe.scheduler.timesteps
    pipe._num_timesteps = len(timesteps)
    cond_mask = cond_mask.to(transformer_dtype)
    gt_velocity = (latents - cond_latent) * cond_mask
    passes = 2 if guidance else 1  # [conditional, unconditional] stacked on the batch dimension
    text = torch.cat([prompt_embeds, negative_prompt_embeds]) if guidance else prompt_embeds
    text = text.to(device=device, dtype=transformer_dtype)
    batch_mask = cond_mask.expand(passes, -1, -1, -1, -1)

    pipe.flywheel_last_step_cache = None
    with contextlib.ExitStack() as speedups:
        # Order matters: weights quantized before the blocks are compiled; the cache hooks go around
        # the compiled block code (flywheel.generate.step_cache). Leaving undoes them in reverse.
        if fp8:
            speedups.enter_context(_float8(transformer))
        if compile:
            speedups.enter_context(_regional_compile(transformer, compile_backend))
        cache_stats = None
        if step_cache_threshold is not None:
            cache_stats = speedups.enter_context(_step_cache(transformer, step_cache_threshold))
        for i, t in enumerate(timesteps):
            pipe._current_timestep = t.cpu().item()
            sigma_t = pipe.scheduler.sigmas[i].expand(1).to(device=device, dtype=torch.float32)
            if conditional_frame_timestep >= 0:
                in_timestep = cond_indicator * conditional_frame_timestep + (1 - cond_indicator) * sigma_t.view(1, 1, 1, 1, 1)
            else:
                in_timestep = sigma_t
            in_latents = (cond_mask * cond_latent + (1 - cond_mask) * latents).to(transformer_dtype)
            velocity = transformer(
                hidden_states=in_latents.expand(passes, -1, -1, -1, -1),
                condition_mask=batch_mask,
                timestep=in_timestep.expand(passes, *in_timestep.shape[1:]),
                encoder_hidden_states=text,
                padding_mask=padding_mask,
                return_dict=False,
            )[0]
            # The conditioning frames' velocity is the known one, as in the stock loop.
            noise_pred = gt_velocity + velocity[:1] * (1 - cond_mask)
            if guidance:
                noise_pred_neg = gt_velocity + velocity[1:] * (1 - cond_mask)
                noise_pred = noise_pred + guidance_scale * (noise_pred - noise_pred_neg)
            latents = pipe.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(pipe, i, t, {"latents": latents})
                latents = (outputs or {}).pop("latents", latents)
    if cache_stats is not None:
        pipe.flywheel_last_step_cache = cache_stats.as_dict()
    pipe._current_timestep = None
    return _decode(pipe, latents, num_frames, output_type, device)


def _regional_compile(transformer: torch.nn.Module, backend: str):
    """Regional compile of the DiT blocks for the duration of one sampling loop."""
    from flywheel.train.speed import RegionalCompile

    return RegionalCompile(transformer, backend=backend)


def _float8(transformer: torch.nn.Module):
    """The DiT blocks' large projections as float8 matmuls for the duration of one sampling loop."""
    from flywheel.model.fp8 import float8_inference

    return float8_inference(transformer, field="GenerateConfig.fp8")


def _step_cache(transformer: torch.nn.Module, threshold: float):
    """First Block Cache for the duration of one sampling loop (a fresh cache per video)."""
    from flywheel.generate.step_cache import StepCache

    return StepCache(transformer, threshold)


def decode_latents(pipe, latents: list[torch.Tensor], num_frames: int) -> list[torch.Tensor]:
    """Several videos' final latents [1, C, T', H', W'] -> their "pt" frames [T, C, H, W], in one VAE call: the
    stock call's tail, batched. The toy VAE decodes 8 videos 5.1x faster together than one by one (its time is
    per-call overhead; benchmarks/cpu_codec.py), and the frames differ from single decodes by float rounding."""
    batch = torch.cat(latents)
    return list(_decode(pipe, batch, num_frames, "pt", batch.device).frames)


def _decode(pipe, latents: torch.Tensor, num_frames: int, output_type: str, device: torch.device):
    """Latents -> frames, exactly the stock call's tail (denormalise, VAE decode, safety check, postprocess)."""
    stock = _stock_module()
    if output_type == "latent":
        return stock.CosmosPipelineOutput(frames=latents)
    latents = latents / pipe.latents_std.to(latents.device, latents.dtype) + pipe.latents_mean.to(latents.device, latents.dtype)
    video = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    video = pipe._match_num_frames(video, num_frames)
    if isinstance(pipe.safety_checker, stock.CosmosSafetyChecker):
        import numpy as np

        pipe.safety_checker.to(device)
        video = pipe.video_processor.postprocess_video(video, output_type="np")
        video = (video * 255).astype(np.uint8)
        video = np.stack([pipe.safety_checker.check_video_safety(v) for v in video]).astype(np.float32) / 255.0 * 2 - 1
        video = torch.from_numpy(video).permute(0, 4, 1, 2, 3)
    return stock.CosmosPipelineOutput(frames=pipe.video_processor.postprocess_video(video, output_type=output_type))


# --- fused LoRA -------------------------------------------------------------------------------


def _adapter_layers(transformer: torch.nn.Module, adapter_name: str) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.lora_A]


@contextlib.contextmanager
def fused_lora(pipe, adapter_name: str):
    """Fold the one active adapter into the transformer's weights inside the block; the exact base weights after.

    Fusing skips the adapter's extra matmuls on every forward. Unfusing alone would leave rounding
    drift in the base weights (W + dW - dW != W in floating point), so the base tensors of the
    adapter's layers are copied first (one copy of the targeted weights, on their device) and
    written back after.
    """
    transformer = pipe.transformer
    active = list(transformer.active_adapters()) if getattr(transformer, "peft_config", None) else []
    if active != [adapter_name]:
        raise ValueError(f"fused_lora({adapter_name!r}) needs exactly that adapter active, the transformer has "
                         f"{active}; call flywheel.generate.world.use_adapter(pipe, {adapter_name!r}) first")
    layers = _adapter_layers(pipe.transformer, adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} has no LoRA layers in the transformer; load it first")
    originals = [{name: p.detach().clone() for name, p in layer.get_base_layer().named_parameters(recurse=False)}
                 for layer in layers]
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[adapter_name])
    try:
        yield
    finally:
        pipe.unfuse_lora(components=["transformer"])
        with torch.no_grad():
            for layer, saved in zip(layers, originals, strict=True):
                for name, p in layer.get_base_layer().named_parameters(recurse=False):
                    p.copy_(saved[name])
