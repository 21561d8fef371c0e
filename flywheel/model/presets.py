"""Model presets: which Cosmos Predict 2.5 pipeline a run uses.

- `tiny`: the exact Cosmos Predict 2.5 classes at toy sizes, built in code from a seed (no network).
- `cosmos-predict2.5-2b`: the released weights (`nvidia/Cosmos-Predict2.5-2B`, revision
  `diffusers/base/post-trained`), or any local directory in diffusers layout.
- `cosmos-predict2.5-2b-random`: the real 2B / 7B / Wan shapes with random weights, for GPU benchmarks.
- `tiny-pusht`: the same classes, small, pretrained on scripted PushT episodes by
  `python -m flywheel.pusht.pretrain` (weights in flywheel/model/weights/tiny-pusht/; the text
  encoder is the `tiny` preset's, rebuilt from its seed). The embedded default's base world model.

Configs are data: each preset is a `ModelPreset` whose fields say what gets built.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import ConfigError
from flywheel.model.safety import SafetyChoice, resolve_safety_checker
from flywheel.model.tiny_tokenizer import TOKENIZER_DIR

COSMOS_2B_REPO = "nvidia/Cosmos-Predict2.5-2B"
COSMOS_2B_REVISION = "diffusers/base/post-trained"

# Cosmos Predict 2.5's sampler: UniPC on flow sigmas with a Karras spacing between 200 and 0.01.
SCHEDULER_CONFIG: dict[str, Any] = dict(
    use_karras_sigmas=True,
    use_flow_sigmas=True,
    prediction_type="flow_prediction",
    sigma_max=200.0,
    sigma_min=0.01,
)


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """What a run's base model is. `model_id` + `revision` identify it in lineage and cache keys."""

    name: str
    model_id: str
    revision: str | None
    height: int
    width: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    dtype: str  # "float32" | "bfloat16"
    max_sequence_length: int
    random_weights: bool  # True: built in code from a seed, no download

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        model_id="flywheel/tiny-cosmos-predict2.5",
        revision="seed-0",
        height=64,
        width=64,
        num_frames=17,
        fps=16,
        num_inference_steps=4,
        guidance_scale=7.0,
        dtype="float32",
        max_sequence_length=64,
        random_weights=True,
    ),
    # Revision None here: `get_preset` fills in the short sha256 of the committed weights.
    "tiny-pusht": ModelPreset(
        name="tiny-pusht",
        model_id="flywheel/tiny-pusht",
        revision=None,
        height=64,
        width=64,
        num_frames=17,
        fps=16,
        num_inference_steps=12,
        # Trained with zeroed text as the unconditional input, never with the negative prompt the
        # pipeline's guidance uses: guidance off (1.0) is the setting it was evaluated with.
        guidance_scale=1.0,
        dtype="float32",
        max_sequence_length=64,
        random_weights=False,
    ),
    "cosmos-predict2.5-2b": ModelPreset(
        name="cosmos-predict2.5-2b",
        model_id=COSMOS_2B_REPO,
        revision=COSMOS_2B_REVISION,
        height=432,
        width=768,
        num_frames=93,
        fps=16,
        num_inference_steps=36,
        guidance_scale=7.0,
        dtype="bfloat16",
        max_sequence_length=512,
        random_weights=False,
    ),
    "cosmos-predict2.5-2b-random": ModelPreset(
        name="cosmos-predict2.5-2b-random",
        model_id="flywheel/cosmos-predict2.5-2b-random",
        revision="seed-0",
        height=432,
        width=768,
        num_frames=93,
        fps=16,
        num_inference_steps=36,
        guidance_scale=7.0,
        dtype="bfloat16",
        max_sequence_length=512,
        random_weights=True,
    ),
}


def get_preset(name_or_path: str) -> ModelPreset:
    """A preset by name, or a local diffusers directory treated as the 2B preset with that path as id."""
    if name_or_path == "tiny-pusht":
        revision = tiny_pusht_revision(TINY_PUSHT_DIR) if (TINY_PUSHT_DIR / TINY_PUSHT_META).is_file() else None
        return dataclasses.replace(PRESETS[name_or_path], revision=revision)
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir() and (path / "model_index.json").is_file():
        return dataclasses.replace(PRESETS["cosmos-predict2.5-2b"], name="local", model_id=str(path.resolve()), revision=None)
    raise ConfigError(
        f"model.preset: unknown model preset {name_or_path!r}: use one of {sorted(PRESETS)} "
        "or a local directory in diffusers layout (with model_index.json)"
    )


# --- component shapes -------------------------------------------------------------------------

# Tiny: 2-layer DiT, small Wan VAE (same 4x temporal / 8x spatial compression as the real one),
# 2-layer Qwen2.5-VL whose two hidden states are concatenated (2 x 32 = 64 channels) as in 2.5.
TINY_TEXT_HIDDEN = 32
TINY_TEXT_LAYERS = 2

TINY_TRANSFORMER = dict(
    in_channels=16 + 1,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    mlp_ratio=2.0,
    text_embed_dim=32,
    adaln_lora_dim=4,
    max_size=(32, 32, 32),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 3.0, 3.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
    use_crossattn_projection=True,
    crossattn_proj_in_channels=TINY_TEXT_HIDDEN * TINY_TEXT_LAYERS,
    encoder_hidden_states_channels=32,
)

TINY_VAE = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)

TINY_TEXT_ENCODER = dict(
    text_config=dict(
        vocab_size=512,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=TINY_TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    ),
    vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TINY_TEXT_HIDDEN),
    vocab_size=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
)

# The released 2B: 28-layer DiT, Qwen2.5-VL-7B (28 layers x 3584 concatenated = 100352), Wan2.1 VAE.
FULL_TRANSFORMER = dict(
    in_channels=16 + 1,
    out_channels=16,
    num_attention_heads=16,
    attention_head_dim=128,
    num_layers=28,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 3.0, 3.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
    use_crossattn_projection=True,
    crossattn_proj_in_channels=100352,
    encoder_hidden_states_channels=1024,
)

FULL_VAE = dict(
    base_dim=96,
    z_dim=16,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    latents_mean=[
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    latents_std=[
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ],
)

FULL_TEXT_ENCODER = dict(
    text_config=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584),
    vocab_size=152064,
)


def _random_transformer(preset: ModelPreset, seed: int, device: torch.device | str | None) -> torch.nn.Module:
    """The random preset's DiT alone: the same weights `_build_random_components` makes (each component has
    its own seed), without building the text encoder and VAE."""
    from diffusers import CosmosTransformer3DModel

    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        torch.manual_seed(seed)
        transformer = CosmosTransformer3DModel(**(TINY_TRANSFORMER if preset.name == "tiny" else FULL_TRANSFORMER))
    _cast(transformer, preset.torch_dtype)
    return transformer.eval().requires_grad_(False)


def _random_vae(preset: ModelPreset, seed: int, device: torch.device | str | None) -> torch.nn.Module:
    """The random preset's VAE alone (its own seed, as in `_build_random_components`)."""
    from diffusers import AutoencoderKLWan

    tiny = preset.name == "tiny"
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device(device):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**(TINY_VAE if tiny else FULL_VAE))
    _cast(vae, torch.float32 if tiny else preset.torch_dtype)
    return vae.eval().requires_grad_(False)


def _build_random_components(preset: ModelPreset, seed: int, device: torch.device | str | None,
                             vae_only: bool = False) -> dict[str, Any]:
    from diffusers import UniPCMultistepScheduler

    device = torch.device(device) if device is not None else torch.device("cpu")
    vae = _random_vae(preset, seed, device)
    if vae_only:  # a codec roundtrip: no 2B DiT, no 7B text encoder to build
        return dict(transformer=None, vae=vae, text_encoder=None, tokenizer=None,
                    scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG))
    transformer = _random_transformer(preset, seed, device)
    text_encoder, tokenizer = _random_text_encoder(preset, seed, device)
    return dict(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG),
    )


def _random_text_encoder(preset: ModelPreset, seed: int, device: torch.device) -> tuple[Any, Any]:
    """The random Qwen2.5-VL text encoder of a preset and its tokenizer. Seeded on its own (seed + 2), so it is
    the same whether or not the transformer and VAE were built before it."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tiny = preset.name == "tiny"
    with torch.device(device):
        torch.manual_seed(seed + 2)
        text_config = Qwen2_5_VLConfig(**(TINY_TEXT_ENCODER if tiny else FULL_TEXT_ENCODER))
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR) if tiny else _full_tokenizer_stand_in()
    _cast(text_encoder, preset.torch_dtype)
    return text_encoder.eval().requires_grad_(False), tokenizer


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast a freshly built model's floating-point weights to `dtype`, keeping the modules the model keeps in
    float32 (diffusers' `_keep_in_fp32_modules`, e.g. Cosmos's learnable_pos_embed) as `from_pretrained(...,
    torch_dtype=...)` does. `module.to(dtype)` would cast those too (diffusers warns about it on every load)."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    for name, sub in module.named_modules():
        target = torch.float32 if keep & set(name.split(".")) else dtype
        for tensors in (sub._parameters, sub._buffers):
            for key, tensor in tensors.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != target:
                    tensor.data = tensor.data.to(target)


def _full_tokenizer_stand_in():
    # No hub: the random 2B preset measures compute, so the tiny tokenizer (padded to the real
    # sequence length) stands in for Qwen2.5-VL's; token ids stay below the real vocabulary size.
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


# --- tiny-pusht: pretrained weights on disk, text encoder from a seed -----------------------------

TINY_PUSHT_DIR = Path(__file__).parent / "weights" / "tiny-pusht"
TINY_PUSHT_META = "flywheel_model.json"  # text encoder seed + fingerprint, training prompts, report summary
TINY_PUSHT_WEIGHTS = ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
TINY_PUSHT_COMMAND = "python -m flywheel.pusht.pretrain --out flywheel/model/weights/tiny-pusht"


def tiny_pusht_revision(weights_dir: Path) -> str:
    """Short sha256 over the weight files (and their configs): the identity of the pretrained model."""
    weights_dir = Path(weights_dir)
    files = [*TINY_PUSHT_WEIGHTS, "transformer/config.json", "vae/config.json"]
    stats = tuple((name, (weights_dir / name).stat().st_size, (weights_dir / name).stat().st_mtime_ns) for name in files)
    return _revision_of(str(weights_dir.resolve()), stats)


@functools.lru_cache(maxsize=8)
def _revision_of(weights_dir: str, stats: tuple) -> str:
    from flywheel.store import hash_file, hash_json

    return hash_json({name: hash_file(Path(weights_dir) / name) for name, _, _ in stats})[:16]


def read_tiny_pusht_meta(weights_dir: Path) -> dict[str, Any]:
    """The model card of a tiny-pusht weights dir; a clear error naming the command when it is missing."""
    weights_dir = Path(weights_dir)
    missing = [name for name in (TINY_PUSHT_META, *TINY_PUSHT_WEIGHTS) if not (weights_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tiny-pusht weights not found in {weights_dir} (missing {missing}); produce them with "
            f"`{TINY_PUSHT_COMMAND}` (add `--device cuda` on a GPU; see flywheel/pusht/pretrain.py)")
    return json.loads((weights_dir / TINY_PUSHT_META).read_text())


def tiny_text_encoder(seed: int) -> tuple[Any, Any]:
    """(text_encoder, tokenizer) of the `tiny` preset built from `seed`, always on CPU: CUDA draws other
    random numbers, and tiny-pusht was trained on the embeddings of exactly this CPU-built encoder."""
    return _random_text_encoder(PRESETS["tiny"], seed, torch.device("cpu"))


def prompt_fingerprint(prompt_embeds: torch.Tensor) -> list[float]:
    """Three random projections (fixed CPU seeds) of prompt embeddings: they change when the text encoder
    does (another seed, another transformers init). Each is a sum over ~4k unit-scale values, so ~60 in
    size, while two runs of the same encoder on CPU and GPU agree to ~1e-4."""
    e = prompt_embeds.detach().double().cpu().flatten()
    projections = []
    for k in range(3):
        w = torch.randn(e.numel(), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        projections.append(round(float(e @ w), 4))
    return projections


def _build_tiny_pusht_components(weights_dir: Path, device: torch.device | str | None) -> tuple[dict[str, Any], dict]:
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler

    meta = read_tiny_pusht_meta(weights_dir)
    text_encoder, tokenizer = tiny_text_encoder(int(meta["text_encoder_seed"]))
    transformer = CosmosTransformer3DModel.from_pretrained(Path(weights_dir) / "transformer", torch_dtype=torch.float32)
    vae = AutoencoderKLWan.from_pretrained(Path(weights_dir) / "vae", torch_dtype=torch.float32)
    for module in (transformer, vae, text_encoder):
        module.eval().requires_grad_(False)
        if device is not None:
            module.to(device)
    components = dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      scheduler=UniPCMultistepScheduler(**SCHEDULER_CONFIG))
    return components, meta


def _check_text_encoder(pipe, meta: dict, weights_dir: Path) -> None:
    """The seed-built text encoder must be the one the weights were trained with, or prompts mean nothing."""
    check = meta["text_encoder_check"]
    with torch.no_grad():
        embeds = pipe._get_prompt_embeds(check["prompt"], max_sequence_length=pipe.flywheel_preset.max_sequence_length)
    got = prompt_fingerprint(embeds)
    if any(abs(a - b) > 0.05 for a, b in zip(got, check["fingerprint"], strict=True)):
        raise RuntimeError(
            f"{weights_dir}: the text encoder rebuilt from seed {meta['text_encoder_seed']} gives other prompt "
            f"embeddings ({got}) than the one these weights were trained with ({check['fingerprint']}, "
            f"transformers {check.get('transformers')}); re-run `{TINY_PUSHT_COMMAND}` with this environment")


def _toy_safety(preset: ModelPreset, safety: SafetyChoice) -> tuple[object | None, dict]:
    """tiny-pusht is a toy trained on synthetic PushT renders: like the random presets, it may run with a
    recorded pass-through checker when cosmos_guardrail is not installed."""
    from flywheel.model.safety import PassThroughSafetyChecker, guardrail_available

    if preset.name == "tiny-pusht" and safety == "auto" and not guardrail_available():
        return PassThroughSafetyChecker(), {"safety_checker": "pass-through",
                                            "safety_opt_out": "toy preset trained on synthetic PushT renders"}
    return resolve_safety_checker(preset, safety)


def resolved_preset(preset: ModelPreset | str, *, seed: int = 0, weights_dir: str | Path | None = None) -> ModelPreset:
    """The preset exactly as `load_pipeline` will stamp it on the pipeline (revision filled in: the
    weights' hash for tiny-pusht, `seed-<seed>` for random weights), without building anything."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.name == "tiny-pusht":
        return dataclasses.replace(preset, revision=tiny_pusht_revision(
            Path(weights_dir) if weights_dir is not None else TINY_PUSHT_DIR))
    if preset.random_weights:
        # The seed is the identity of random weights: it goes into the revision (lineage, cache keys).
        return dataclasses.replace(preset, revision=f"seed-{seed}")
    return preset


@dataclasses.dataclass
class TransformerOnly:
    """What training on a latent cache needs of a pipeline, and nothing else: the DiT (no 7B text encoder, no VAE,
    no safety checker: nothing is encoded or generated). Quacks like the pipeline where training looks."""

    transformer: torch.nn.Module
    flywheel_preset: ModelPreset
    flywheel_safety: dict = dataclasses.field(default_factory=dict)
    text_encoder: None = None
    vae: None = None


# Every model load of this process: {"preset", "parts", "device", "import_s", "load_s"}; a workload reports them
# (flywheel.workloads.entrypoint), so what a step spends loading weights is measured, not guessed.
_LOADS: list[dict[str, Any]] = []


def model_loads() -> list[dict[str, Any]]:
    """The model loads of this process so far, oldest first (see `load_pipeline`)."""
    return [dict(load) for load in _LOADS]


def load_pipeline(
    preset: ModelPreset | str,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    safety: SafetyChoice = "auto",
    weights_dir: str | Path | None = None,
    vae_only: bool = False,
    transformer_only: bool = False,
):
    """Build or load the `Cosmos2_5_PredictBasePipeline` of a preset.

    `vae_only`: a downloaded / local model is loaded without its transformer and text encoder (diffusers
    skips components passed as None), a random-weight one built without them: all a codec roundtrip needs,
    without the 7B text encoder. tiny-pusht is loaded whole either way (it is small).
    `transformer_only`: a `TransformerOnly` holding the DiT alone, for every preset (for the random ones the
    same weights as the whole pipeline's): what training on a latent cache needs.

    Returns the pipeline; `pipe.flywheel_safety` records which safety checker is in use (it goes
    into run metadata, so an opt-out is never silent). `weights_dir` (tiny-pusht only) loads
    pretrained weights from another directory than the committed ones; `seed` does not apply to
    tiny-pusht (its text encoder seed is part of its weights).
    """
    started = time.perf_counter()  # the first load of a process also pays for importing diffusers (+ transformers)
    if transformer_only:
        from diffusers import CosmosTransformer3DModel  # noqa: F401
    else:
        from diffusers import Cosmos2_5_PredictBasePipeline  # noqa: F401
    imported = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if vae_only and transformer_only:
        raise ValueError("load_pipeline: pass vae_only or transformer_only, not both")
    if weights_dir is not None and preset.name != "tiny-pusht":
        raise ValueError(f"weights_dir is only for the tiny-pusht preset, not {preset.name!r}")
    if transformer_only:
        pipe = _load_transformer_only(preset, seed, device, weights_dir)
    else:
        pipe = _load_whole(preset, seed, device, safety, weights_dir, vae_only)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the load's own time, not the next call's
    _LOADS.append({"preset": pipe.flywheel_preset.name, "device": str(device),
                   "parts": "transformer" if transformer_only else "vae" if vae_only else "all",
                   "import_s": round(imported - started, 3), "load_s": round(time.perf_counter() - imported, 3)})
    return pipe


def _load_transformer_only(preset: ModelPreset, seed: int, device, weights_dir) -> TransformerOnly:
    from diffusers import CosmosTransformer3DModel

    if preset.name == "tiny-pusht":
        weights_dir = Path(weights_dir) if weights_dir is not None else TINY_PUSHT_DIR
        read_tiny_pusht_meta(weights_dir)  # the clear error when the weights are missing
        transformer = CosmosTransformer3DModel.from_pretrained(weights_dir / "transformer", torch_dtype=torch.float32)
        preset = resolved_preset(preset, weights_dir=weights_dir)
    elif preset.random_weights:
        preset = resolved_preset(preset, seed=seed)
        return TransformerOnly(_random_transformer(preset, seed, device), preset)
    else:
        kwargs: dict[str, Any] = dict(subfolder="transformer", torch_dtype=preset.torch_dtype)
        if preset.revision:
            kwargs["revision"] = preset.revision
        transformer = CosmosTransformer3DModel.from_pretrained(preset.model_id, **kwargs)
    transformer.eval().requires_grad_(False)
    if device is not None:
        transformer.to(device)
    return TransformerOnly(transformer, preset)


def _load_whole(preset: ModelPreset, seed: int, device, safety: SafetyChoice, weights_dir, vae_only: bool):
    from diffusers import Cosmos2_5_PredictBasePipeline

    checker, safety_record = _toy_safety(preset, safety)
    if preset.name == "tiny-pusht":
        weights_dir = Path(weights_dir) if weights_dir is not None else TINY_PUSHT_DIR
        components, meta = _build_tiny_pusht_components(weights_dir, device)
        preset = resolved_preset(preset, weights_dir=weights_dir)
        pipe = Cosmos2_5_PredictBasePipeline(**components, safety_checker=checker)
        pipe.flywheel_preset = preset
        _check_text_encoder(pipe, meta, weights_dir)
    elif preset.random_weights:
        preset = resolved_preset(preset, seed=seed)
        components = _build_random_components(preset, seed, device, vae_only=vae_only)
        pipe = Cosmos2_5_PredictBasePipeline(**components, safety_checker=checker)
    else:
        kwargs: dict[str, Any] = dict(torch_dtype=preset.torch_dtype, safety_checker=checker)
        if preset.revision:
            kwargs["revision"] = preset.revision
        if vae_only:
            kwargs.update(transformer=None, text_encoder=None)
        pipe = Cosmos2_5_PredictBasePipeline.from_pretrained(preset.model_id, **kwargs)
        if device is not None:
            pipe.to(device)
    pipe.flywheel_preset = preset
    pipe.flywheel_safety = safety_record
    pipe.set_progress_bar_config(disable=True)
    if pipe.vae is not None and pipe.vae.device.type == "cpu":
        _channels_last_convolutions(pipe.vae)
    return pipe


def _channels_last_convolutions(vae: torch.nn.Module) -> None:
    """The VAE's 3-D convolutions in channels-last layout, on a CPU only: oneDNN's fast path, and the Wan
    VAE's per-voxel RMS norms over channels then read contiguous memory. Measured on 2 cores: 16 clips of
    17x64x64 round-trip in 5.0 s instead of 7.4 s, the frames within one gray level of the default layout's.
    GPUs keep the layout the GPU benchmarks measured."""
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=torch.channels_last_3d)
