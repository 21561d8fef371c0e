"""What a generation run does: sampler settings, seeds, prompt variations. Configs are data.

Fields left as None take the model preset's value (`resolved(preset)`), so the same config works
for the tiny pipeline in tests and the 2B model on a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import torch

    from flywheel.model.presets import ModelPreset

# Extra phrasings of a clip's prompt: more varied synthetic rollouts from the same first frame.
# Variant 0 is always the clip's own prompt; variant k uses PROMPT_VARIATIONS[k - 1].
PROMPT_VARIATIONS: list[str] = [
    "{prompt} The robot moves slowly and carefully.",
    "{prompt} The robot completes the task smoothly in a single attempt.",
    "{prompt} The scene is brightly lit and the camera is static.",
]


class GenerateConfig(BaseModel):
    """Image-to-world generation settings. None means: the model preset's value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter: str = Field("champion", description="which adapter generates the synthetic videos: 'champion' (the "
                         "domain's promoted adapter; the base model while there is none), 'base', a registry version "
                         "such as '3', 'latest' (the domain's latest trained adapter), an adapter key under "
                         "<home>/adapters, or an adapter directory (flywheel.decisions.choose_generating_adapter)")
    seeds: list[int] = Field(default_factory=lambda: [0])
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None  # None: the pipeline's default negative prompt
    max_videos: int | None = None  # cap on the requests built from a clip table
    prompts_per_first_frame: int = 1  # 1: the clip's prompt only; k: plus k-1 of prompt_variations
    prompt_variations: list[str] = Field(default_factory=lambda: list(PROMPT_VARIATIONS))
    conditional_frame_timestep: float = 1e-4
    # How the videos are computed (flywheel.generate.sampler), not what they are: "fast" gives the stock
    # call's frames up to float rounding, with cond+uncond in one forward and each prompt encoded once.
    # None: our sampler everywhere; compiled blocks and fused LoRA on a CUDA GPU only (`resolved`).
    sampler: Literal["stock", "fast"] | None = None
    compile: bool | None = Field(None, description="fast sampler: torch.compile each DiT block (regional compile); "
                                 "None: on a CUDA GPU")
    fuse_lora: bool | None = Field(None, description="fold the active adapter into the base weights while its "
                                   "requests run (exact base weights restored after); None: on a CUDA GPU")
    decode_batch: int | None = Field(
        None, ge=1, description="fast sampler: videos decoded in one VAE call; None: as many as 4 M pixels allow, at "
        "most 16 (a toy model's 17x64x64 videos 16 at a time, 4x faster than one by one; a 93x432x768 one alone). "
        "Frames then differ from a single decode by float rounding (at most 1 gray level); 1: each video alone, "
        "bit-identical to the stock call's tail")
    fp8: bool = Field(False, description="fast sampler: the DiT blocks' large projections as torchao float8 matmuls "
                      "(per-row scales) during each video, bf16 weights restored after; needs torchao and a CUDA GPU "
                      "with compute capability >= 8.9. With fuse_lora the adapter is fused first, then quantized")
    step_cache_threshold: float | None = Field(
        None, ge=0, description="fast sampler: First Block Cache (diffusers hooks) on the DiT: a step whose first-block "
        "residual changed by less than this relative amount since the last computed step reuses the other blocks' "
        "residual; higher is faster and less exact; 0 installs the cache but never skips; None: off")

    @field_validator("adapter", mode="before")
    @classmethod
    def _version_number_as_text(cls, value):
        # `--set generate.adapter=3` (and `adapter: 3` in YAML) parse as an int: it is registry version "3".
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds:
            raise ValueError("seeds must list at least one seed, e.g. [0]")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, got {seeds}")
        if any(s < 0 for s in seeds):
            raise ValueError(f"seeds must be >= 0 (torch.Generator.manual_seed), got {seeds}")
        return seeds

    @field_validator("num_inference_steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"num_inference_steps must be > 0, got {v}")
        return v

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, v: float | None) -> float | None:
        if v is not None and v < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 turns classifier-free guidance off), got {v}")
        return v

    @field_validator("num_frames")
    @classmethod
    def _num_frames(cls, v: int | None) -> int | None:
        # The Wan VAE compresses time 4x after the first frame: only 4k+1 frames map to whole latents.
        if v is not None and (v < 1 or (v - 1) % 4 != 0):
            raise ValueError(f"num_frames must be 4k+1 (e.g. 17, 93), got {v}")
        return v

    @field_validator("fps", "max_videos")
    @classmethod
    def _positive(cls, v: int | None, info) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, v: int | None, info) -> int | None:
        # 8x VAE downsampling then 2x2 transformer patches.
        if v is not None and (v <= 0 or v % 16 != 0):
            raise ValueError(f"{info.field_name} must be a positive multiple of 16, got {v}")
        return v

    @field_validator("conditional_frame_timestep")
    @classmethod
    def _cond_timestep(cls, v: float) -> float:
        if v < 0:
            raise ValueError(f"conditional_frame_timestep must be >= 0, got {v}")
        return v

    @field_validator("prompt_variations")
    @classmethod
    def _variations(cls, v: list[str]) -> list[str]:
        missing = [t for t in v if "{prompt}" not in t]
        if missing:
            raise ValueError(f"every prompt_variations template must contain '{{prompt}}'; these do not: {missing}")
        return v

    @model_validator(mode="after")
    def _enough_variations(self) -> "GenerateConfig":
        if self.prompts_per_first_frame < 1:
            raise ValueError(f"prompts_per_first_frame must be >= 1, got {self.prompts_per_first_frame}")
        if self.prompts_per_first_frame > 1 + len(self.prompt_variations):
            raise ValueError(
                f"prompts_per_first_frame={self.prompts_per_first_frame} needs "
                f"{self.prompts_per_first_frame - 1} prompt_variations, only {len(self.prompt_variations)} given; "
                "add templates to prompt_variations or lower prompts_per_first_frame"
            )
        return self

    @model_validator(mode="after")
    def _speed_settings_need_fast_sampler(self) -> "GenerateConfig":
        if self.sampler != "stock":  # None: asking for one of these picks the fast sampler (resolved)
            return self
        asked = [name for name, on in (("compile=True", self.compile), ("fp8=True", self.fp8),
                                       ("step_cache_threshold", self.step_cache_threshold is not None),
                                       ("decode_batch", (self.decode_batch or 1) > 1)) if on]
        if asked:
            raise ValueError(f"{', '.join(asked)} applies to our sampler only; set sampler='fast' (or turn it off)")
        return self

    def resolved(self, preset: "ModelPreset", device: "str | torch.device | None" = None) -> "GenerateConfig":
        """A copy with every None sampler setting filled from the preset and, given the pipeline's
        `device`, the speed settings too (what actually runs).

        Our sampler is the default everywhere: the stock call's frames up to float rounding (exact in fp32,
        flywheel_tests/generate/test_sampler.py), and on a CPU the adapter evaluation takes 18 % less time
        (no blank-frame encode, one forward for cond + uncond). On a CUDA GPU also compiled blocks and fused
        LoRA; not on a CPU, where compiling costs more than it saves and fusing moves the frames by rounding.
        """
        update = dict(
            num_inference_steps=self.num_inference_steps or preset.num_inference_steps,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else preset.guidance_scale,
            num_frames=self.num_frames or preset.num_frames,
            fps=self.fps or preset.fps,
            height=self.height or preset.height,
            width=self.width or preset.width,
        )
        if device is not None:
            import torch

            cuda = torch.device(device).type == "cuda"
            sampler = self.sampler or "fast"
            update.update(sampler=sampler,
                          compile=self.compile if self.compile is not None else (cuda and sampler == "fast"),
                          fuse_lora=self.fuse_lora if self.fuse_lora is not None else cuda)
        return self.model_copy(update=update)

    def prompt_variant(self, prompt: str, variant: int) -> str:
        """Variant 0 is the prompt itself; variant k its k-th extra phrasing."""
        return prompt if variant == 0 else self.prompt_variations[variant - 1].replace("{prompt}", prompt)
