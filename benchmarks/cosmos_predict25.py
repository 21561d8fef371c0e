"""Cosmos Predict 2.5 LoRA/DoRA training step and image-to-world generation: stock baseline vs our code paths.

One process, one set of random weights (preset `cosmos-predict2.5-2b-random`: the real 2B DiT, Qwen2.5-VL-7B
and Wan2.1 VAE shapes), bf16, batch 1, 93 frames at 432x768, LoRA r=32:

  generation baseline: the stock pipeline call (prompt strings, 36 steps, guidance 7) with a fused LoRA;
             ours: flywheel.generate.sampler (cond+uncond batched, embeddings precomputed, first-frame
             encode, regional compile, fused LoRA) from the same initial latents; optional: float8
             matmuls (GenerateConfig.fp8, torchao) and First Block Cache step caching
             (GenerateConfig.step_cache_threshold), alone and together. PSNR vs the stock frames for each.
  training   baseline: the recipe's per-step work (VAE encode of the clip + text encode of the prompt +
             eager DiT step with full gradient checkpointing, AdamW);
             ours: flywheel.train.lora.training_step on precomputed latents/embeddings, with
             flywheel.train.speed settings (checkpointing none/full/selective, regional compile, fused AdamW,
             float8 base projections), LoRA and DoRA.

Every variant runs in try/except: an out-of-memory or a failure is a result, not a crash; an fp8 variant
where torchao or an fp8 GPU is missing is recorded as skipped. The baselines (stock call, recipe step) always
run in the same process for the ratios; core variants run unless --skip-core; optional ones in the listed
order (most informative first) while --budget-s lasts; --only NAME[,NAME...] keeps the variants whose name
starts with one of the given names or prefixes.

Writes <out>/<gpu-slug>.json and <out>/<gpu-slug>.md after every workload (a run cut short keeps what it
measured), prints a line per result and the table at the end. Usage (GPU):

    python benchmarks/cosmos_predict25.py --out benchmarks/results          # core, then optional variants
    python benchmarks/cosmos_predict25.py --list                            # variant names, in run order
    python benchmarks/cosmos_predict25.py --skip-core --budget-s 530 --out $OUT \
        --only 'generate_i2w[step_cache,generate_i2w[fp8,train_lora[compile+selective(attention)+fp8],train_lora[compile+selective(attention_matmul)'
    python benchmarks/cosmos_predict25.py --preset tiny --device cpu --quick --no-compile --out /tmp/b  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from flywheel.image_metrics import psnr  # noqa: E402

# Model FLOPs of one training step of the 2B at 93x432x768 (reference/h200_cosmos_lora.json).
REFERENCE_TFLOP_PER_STEP = {"cosmos-predict2.5-2b-random": 881.7, "cosmos-predict2.5-2b": 881.7}
TARGET_PEAK_GIB = 80.0
PROMPT = ("A humanoid robot stands at a table, reaches for the yellow bottle with its right hand, grasps it "
          "and lifts it, while the camera stays still.")
SCHEMA = "flywheel-benchmark/1"
DEFAULT_STEP_CACHE_THRESHOLDS = "0.05,0.1"
# Seconds an optional variant needs at 2B (H200), to decide whether it still fits in --budget-s.
# (The 2026-11 H200 run: a block compile took ~25 s, a training step 2.3 s, a compiled video 45 s.)
TRAIN_NEED_S = {True: 60, False: 40}  # compiled / eager: warm-up (+ compile) and 3 timed steps
GENERATE_NEED_S = 50  # one 36-step video and a 1-step warm-up
COMPILE_NEED_S = 30  # first compile of a block graph kind (bf16 or fp8)


@dataclasses.dataclass(frozen=True)
class TrainVariant:
    method: str  # lora | dora
    checkpointing: str  # none | full | selective
    save: str = "attention"  # what selective keeps
    compile: bool = False
    fp8: bool = False  # TrainConfig.fp8: float8 base projections (torchao)
    autocast: bool = False  # TrainConfig.autocast: the fp32 adapter's products in bf16 (False: in fp32, as before)
    core: bool = True  # core variants always run (unless --skip-core); the rest while the budget lasts

    @property
    def name(self) -> str:
        ckpt = f"selective({self.save})" if self.checkpointing == "selective" else self.checkpointing
        suffix = ("+fp8" if self.fp8 else "") + ("+autocast" if self.autocast else "")
        return f"train_{self.method}[{'compile' if self.compile else 'eager'}+{ckpt}{suffix}]"


# Core first, then the optional ones in the order they run: the most informative first.
TRAIN_VARIANTS = [
    TrainVariant("lora", "full"),
    TrainVariant("lora", "selective", compile=True),
    TrainVariant("dora", "selective", compile=True),
    TrainVariant("lora", "selective", save="attention_matmul", compile=True, autocast=True),
    TrainVariant("lora", "selective", compile=True, autocast=True),
    TrainVariant("dora", "selective", compile=True, autocast=True),
    TrainVariant("dora", "selective", save="attention_matmul", compile=True, autocast=True),
    TrainVariant("lora", "selective", save="attention_matmul", compile=True, fp8=True, autocast=True, core=False),
    TrainVariant("lora", "selective", compile=True, fp8=True, core=False),
    TrainVariant("lora", "selective", save="attention_matmul", compile=True, core=False),
    TrainVariant("lora", "selective", save="attention_matmul", compile=True, fp8=True, core=False),
    TrainVariant("lora", "full", compile=True, core=False),
    TrainVariant("lora", "none", compile=True, core=False),
    TrainVariant("dora", "full", core=False),
]


@dataclasses.dataclass(frozen=True)
class GenerateVariant:
    compile: bool = True  # regional compile (turned off for every variant by --no-compile)
    fp8: bool = False  # GenerateConfig.fp8
    step_cache: float | None = None  # GenerateConfig.step_cache_threshold
    core: bool = False

    @property
    def name(self) -> str:
        parts = (([] if self.compile else ["eager"]) + (["fp8"] if self.fp8 else [])
                 + ([f"step_cache={self.step_cache:g}"] if self.step_cache is not None else []))
        return "generate_i2w" + (f"[{'+'.join(parts)}]" if parts else "")


def generate_variants(thresholds: list[float]) -> list[GenerateVariant]:
    """Core, then the optional ones in the order they run: step cache, fp8, both; other thresholds; eager."""
    first, *others = thresholds or [None]
    variants = [GenerateVariant(core=True)]
    if first is not None:
        variants.append(GenerateVariant(step_cache=first))
    variants.append(GenerateVariant(fp8=True))
    if first is not None:
        variants.append(GenerateVariant(fp8=True, step_cache=first))
    for threshold in others:
        variants += [GenerateVariant(step_cache=threshold), GenerateVariant(fp8=True, step_cache=threshold)]
    variants.append(GenerateVariant(compile=False))
    return variants


def selected(args, name: str, core: bool) -> bool:
    """--only (names or prefixes) and --skip-core. A pattern that is a variant's full name selects that
    variant alone (`generate_i2w` is the core generation variant, not every `generate_i2w[...]` one)."""
    patterns = [p.strip() for p in (args.only or "").split(",") if p.strip()]
    if name in patterns:
        return True
    if core and args.skip_core:
        return False
    names = set(variant_names(args))
    return not patterns or any(name.startswith(p) for p in patterns if p not in names)


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.workloads: dict[str, dict] = {}
        self.baseline_train: dict | None = None  # the recipe step, measured once
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # its latents + embeddings, reused by our path
        self.header: dict = {}  # the report's fields besides the workloads (set once the model is built)

    def log(self, message: str) -> None:
        print(f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - self.started:6.1f}s] {message}", flush=True)

    def time_left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def measure(self, fn: Callable[[], object], warmup: int, reps: int) -> tuple[float, float | None, list[float]]:
        """(median seconds, peak GiB of the timed reps, all times); warm-up runs are not timed."""
        for _ in range(warmup):
            fn()
        self.sync()
        self.reset_peak()
        times = []
        for _ in range(reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), self.peak_gib(), times

    def record(self, name: str, result: dict) -> None:
        """Keep one workload's result and rewrite the report (a run cut short keeps what it measured)."""
        self.workloads[name] = result
        self.save()

    def report(self) -> dict:
        return dict(self.header, wall_s=round(time.perf_counter() - self.started, 1), workloads=self.workloads)

    def save(self, report: dict | None = None) -> tuple[Path, Path] | None:
        if not self.header:
            return None
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = report or self.report()
        stem = self.header["stem"]
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
        (out / f"{stem}.md").write_text(f"# {report['gpu']} {report['preset']} ({report['date']})\n\n"
                                        f"{markdown_table(self.workloads)}\n")
        return out / f"{stem}.json", out / f"{stem}.md"


def gpu_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def software_versions() -> dict:
    import diffusers
    import peft
    import transformers

    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "torchao": torchao_version, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": sys.version.split()[0]}


def workload(baseline_s, ours_s, peak_gib, tflop, notes, **extra) -> dict:
    speedup = round(baseline_s / ours_s, 3) if baseline_s and ours_s else None
    tflops = round(tflop / ours_s, 1) if tflop and ours_s else None
    rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in extra.items()}
    return dict(baseline_s=_r(baseline_s), ours_s=_r(ours_s), speedup=speedup, peak_gib=peak_gib, tflops=tflops,
                notes=notes, **rounded)


def _r(x):
    return None if x is None else round(float(x), 4)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


# --- training ---------------------------------------------------------------------------------


def train_config(method: str, checkpointing: str, save: str = "attention", compile: bool = False,
                 compile_backend: str = "inductor", fused: bool | None = None, fp8: bool = False,
                 autocast: bool = False):
    from flywheel.train.config import TrainConfig

    return TrainConfig(method=method, rank=32, alpha=32, steps=10_000, activation_checkpointing=checkpointing,
                       selective_save=save, compile=compile, compile_backend=compile_backend, fused_optimizer=fused,
                       fp8=fp8, autocast=autocast)


def run_training(bench: Bench, pipe, config, batch_fn, warmup: int, reps: int) -> dict:
    """Time training_step (our code path) under `config`; the adapter is removed and the compile cache reset after."""
    from flywheel.train.adapter_io import remove_adapter
    from flywheel.train.lora import add_training_adapter, training_step
    from flywheel.train.speed import apply_training_speedups, build_optimizer_and_scheduler

    transformer = pipe.transformer
    preset = pipe.flywheel_preset
    padding_mask = torch.zeros(1, 1, preset.height, preset.width, device=bench.device)
    generator = torch.Generator(device=bench.device).manual_seed(0)
    result = dict(seconds=None, peak_gib=None, error=None)
    losses: list[float] = []
    undo: Callable[[], None] = lambda: None
    optimizer = scheduler = None
    params = add_training_adapter(transformer, config)
    try:
        optimizer, scheduler = build_optimizer_and_scheduler(params, config, bench.device)
        undo = apply_training_speedups(transformer, config)  # fp8 / checkpointing / compile
        transformer.train()

        def step():
            latents, embeds = batch_fn()
            losses.append(training_step(transformer, params, optimizer, scheduler, latents, embeds, padding_mask,
                                        generator, config)["loss"])

        seconds, peak, times = bench.measure(step, warmup, reps)
        result.update(seconds=seconds, peak_gib=peak, times=[round(t, 3) for t in times],
                      finite=all(math.isfinite(x) for x in losses))
    except torch.OutOfMemoryError:
        result.update(error="out of memory", peak_gib=bench.peak_gib())
    except Exception as e:  # one failing variant must not cost the others their measurement
        bench.log(traceback.format_exc())
        result.update(error=_error(e))
    finally:
        undo()
        remove_adapter(pipe)
        transformer.eval()
        del optimizer, scheduler, params
        bench.free()
        torch._dynamo.reset()  # each variant compiles its own graphs; keep Dynamo's recompile budget for the next
    return result


def bench_training(bench: Bench, pipe, tflop_per_step: float | None) -> None:
    from flywheel.model.fp8 import fp8_unavailable_reason

    args = bench.args
    variants = []
    for variant in TRAIN_VARIANTS:
        if variant.compile and args.no_compile:
            variant = dataclasses.replace(variant, compile=False)
        if selected(args, variant.name, variant.core) and variant.name not in {v.name for v in variants}:
            variants.append(variant)
    if not variants:
        return
    preset = pipe.flywheel_preset
    device = bench.device
    reps = 2 if args.quick else 3
    vae_dtype = pipe.vae.dtype
    torch.manual_seed(0)
    video = (torch.rand(1, 3, preset.num_frames, preset.height, preset.width, device=device) * 2 - 1).to(vae_dtype)

    def encode():
        with torch.no_grad():
            mu = pipe.vae.encode(video).latent_dist.mean.float()
            latents = (mu - pipe.latents_mean.to(device)) * pipe.latents_std.to(device)
            embeds = pipe._get_prompt_embeds(PROMPT, max_sequence_length=preset.max_sequence_length, device=device)
        return latents, embeds

    bench.log(f"training baseline: recipe step (VAE encode {tuple(video.shape)} + text encode "
              f"{preset.max_sequence_length} tokens + eager DiT step, full checkpointing), {reps} reps")
    baseline = run_training(bench, pipe, train_config("lora", "full", fused=False), encode, 1, reps)
    bench.baseline_train = baseline
    bench.log(f"  recipe step {baseline['seconds']} s, peak {baseline['peak_gib']} GiB {baseline['error'] or ''}")
    bench.batch = encode()
    # Our path never needs the text encoder or VAE while training: off the GPU, as with a latent cache.
    pipe.text_encoder.to("cpu")
    pipe.vae.to("cpu")
    bench.free()

    fp8_missing = fp8_unavailable_reason(device)
    for variant in variants:
        name = variant.name
        if variant.fp8 and fp8_missing:
            bench.record(name, workload(baseline["seconds"], None, None, None, f"skipped: fp8 needs {fp8_missing}"))
            bench.log(f"{name}: skipped (fp8 needs {fp8_missing})")
            continue
        if not variant.core and bench.time_left() < TRAIN_NEED_S[variant.compile]:
            bench.record(name, workload(baseline["seconds"], None, None, None, "skipped: time budget"))
            bench.log(f"{name}: skipped (time budget)")
            continue
        bench.log(f"{name}: warm-up{' (compile)' if variant.compile else ''} + {reps} reps")
        config = train_config(variant.method, variant.checkpointing, variant.save, variant.compile,
                              args.compile_backend, fp8=variant.fp8, autocast=variant.autocast)
        result = run_training(bench, pipe, config, lambda: bench.batch, 2 if variant.compile else 1, reps)
        notes = ("precomputed latents+embeddings, fused AdamW" if device.type == "cuda" else "precomputed latents+embeddings")
        if variant.fp8:
            notes += ", float8 base projections (torchao Float8Linear, tensorwise)"
        if variant.autocast:
            notes += ", autocast: fp32 adapter's products in bf16"
        if result["error"]:
            notes = f"{result['error']}; {notes}"
        extra = {}
        if variant.method == "dora":
            lora_name = dataclasses.replace(variant, method="lora").name
            lora_s = bench.workloads.get(lora_name, {}).get("ours_s")
            if lora_s and result["seconds"]:
                extra["dora_over_lora"] = round(result["seconds"] / lora_s, 3)
        bench.record(name, workload(baseline["seconds"], result["seconds"], result["peak_gib"], tflop_per_step, notes,
                                    baseline_peak_gib=baseline["peak_gib"], times=result.get("times"), **extra))
        bench.log(f"  {name}: {result['seconds']} s, peak {result['peak_gib']} GiB {result['error'] or ''}")
    for method in ("lora", "dora"):
        best = best_training(bench.workloads, method)
        if best:
            bench.record(f"train_{method}", dict(bench.workloads[best], notes=f"best: {best}"))


def best_training(workloads: dict, method: str) -> str | None:
    """The fastest measured variant that fits the memory target."""
    fits = [(w["ours_s"], name) for name, w in workloads.items()
            if name.startswith(f"train_{method}[") and w["ours_s"]
            and (w["peak_gib"] is None or w["peak_gib"] <= TARGET_PEAK_GIB)]
    return min(fits)[1] if fits else None


# --- generation -------------------------------------------------------------------------------


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two float videos in [0, 1]; 100 dB stands for identical."""
    return psnr(a, b, peak=1.0, cap=100.0)


def forward_tflop(pipe, latents: torch.Tensor, embeds: torch.Tensor) -> float | None:
    """Model FLOPs of one batch-1 transformer forward, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    transformer = pipe.transformer
    preset = pipe.flywheel_preset
    dtype = transformer.dtype
    mask = torch.zeros(1, 1, *latents.shape[2:], device=latents.device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        transformer(hidden_states=latents.to(dtype), condition_mask=mask,
                    timestep=torch.full((1, 1, latents.shape[2], 1, 1), 0.5, device=latents.device),
                    encoder_hidden_states=embeds.to(dtype),
                    padding_mask=torch.zeros(1, 1, preset.height, preset.width, device=latents.device, dtype=dtype),
                    return_dict=False)
    return counter.get_total_flops() / 1e12 or None


def make_bench_adapter(pipe, root: Path) -> str:
    """A random r=32 LoRA (non-zero B, so it changes the output), saved and loaded through the stock loader."""
    from flywheel.train.adapter_io import AdapterCard, load_adapter, remove_adapter, save_adapter
    from flywheel.train.lora import add_training_adapter

    transformer = pipe.transformer
    config = train_config("lora", "none")
    add_training_adapter(transformer, config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    card = AdapterCard(method="lora", rank=32, alpha=32, scaling=1.0, target_modules=list(config.target_modules),
                       base_model={"model_id": pipe.flywheel_preset.model_id}, num_trainable_parameters=0)
    save_adapter(transformer, root / "bench-lora", card)
    remove_adapter(pipe)
    load_adapter(pipe, root / "bench-lora", "bench")
    return "bench"


def _generation_notes(variant: GenerateVariant, compile: bool, cache: dict | None) -> str:
    means = ["batched cond+uncond", "embeddings once per prompt", "fused LoRA"]
    if compile:
        means.append("regional compile")
    if variant.fp8:
        means.append("float8 block projections (torchao per-row, quantized per video)")
    if cache:
        means.append(f"First Block Cache t={cache['threshold']:g}: {cache['skipped_steps']}/{cache['steps']} steps "
                     "skipped blocks 1..N-1")
    tflops = ("tflops counts the DiT forwards only (2 per step)" if not cache
              else "tflops omitted (skipped steps did not run most blocks)")
    return f"ours: {', '.join(means)}; baseline: stock call with prompt strings (text encode included); {tflops}"


PRECOMPUTE = "precompute_clip"


def bench_precompute(bench: Bench, pipe) -> None:
    """The latent cache's work per clip, with the functions the clips stage calls (flywheel.model.encode):
    frames preprocessed and VAE-encoded, and the prompt text-encoded (once per unique prompt in a real
    clip set). Reported as clips per minute, against the training step it feeds."""
    from PIL import Image

    from flywheel.model.encode import encode_prompt, encode_videos

    if not selected(bench.args, PRECOMPUTE, True):
        return
    preset = pipe.flywheel_preset
    pipe.text_encoder.to(bench.device)
    pipe.vae.to(bench.device)
    bench.free()
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8))
              for _ in range(preset.num_frames)]
    reps = 2 if bench.args.quick else 3
    bench.log(f"{PRECOMPUTE}: VAE encode of one {preset.num_frames}x{preset.height}x{preset.width} clip "
              f"(+ preprocessing) and one {preset.max_sequence_length}-token prompt, {reps} reps")
    with torch.inference_mode():
        vae_s, vae_peak, _ = bench.measure(lambda: encode_videos(pipe, [frames], preset.height, preset.width), 1, reps)
        text_s, text_peak, _ = bench.measure(lambda: encode_prompt(pipe, PROMPT, preset.max_sequence_length), 1, reps)
    per_clip = vae_s + text_s
    train = bench.workloads.get("train_lora", {}).get("ours_s")
    bench.record(PRECOMPUTE, workload(
        None, per_clip, max(p for p in (vae_peak, text_peak) if p is not None) if vae_peak is not None else None,
        None, "latent cache: VAE encode + text encode of one clip (a prompt shared by many clips is encoded once)",
        vae_s=vae_s, text_s=text_s, clips_per_minute=60.0 / per_clip,
        clips_per_minute_shared_prompt=60.0 / vae_s))
    bench.log(f"  {PRECOMPUTE}: VAE {vae_s:.3f} s + text {text_s:.3f} s per clip = {60.0 / per_clip:.1f} clips/min "
              f"({60.0 / vae_s:.1f} with a shared prompt){'' if not train else f'; a LoRA step takes {train} s'}")


def bench_generation(bench: Bench, pipe) -> None:
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT
    from PIL import Image

    from flywheel.generate.sampler import fused_lora, sample_image_to_world
    from flywheel.model.fp8 import fp8_unavailable_reason
    from flywheel.train.adapter_io import remove_adapter

    args = bench.args
    thresholds = [float(t) for t in args.step_cache_thresholds.split(",") if t.strip()]
    variants = [v for v in generate_variants(thresholds) if selected(args, v.name, v.core)]
    if args.no_compile:  # every variant runs eager: the [eager] one would repeat the core one
        variants = [v for v in variants if v.compile]
    if not variants:
        return
    preset = pipe.flywheel_preset
    device = bench.device
    pipe.text_encoder.to(device)
    pipe.vae.to(device)
    bench.free()
    steps, guidance = preset.num_inference_steps, preset.guidance_scale
    settings = dict(height=preset.height, width=preset.width, num_frames=preset.num_frames, guidance_scale=guidance,
                    conditional_frame_timestep=1e-4, output_type="np")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8))
    latent_shape = (1, pipe.transformer.config.in_channels - 1, (preset.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
                    preset.height // pipe.vae_scale_factor_spatial, preset.width // pipe.vae_scale_factor_spatial)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT,
                                              do_classifier_free_guidance=True, device=device,
                                              max_sequence_length=preset.max_sequence_length)

    def stock(num_steps: int):
        return pipe(image=image, prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, latents=latents,
                    num_inference_steps=num_steps, max_sequence_length=preset.max_sequence_length,
                    **settings).frames[0]

    def ours(num_steps: int, variant: GenerateVariant, compile: bool):
        return sample_image_to_world(pipe, image, embeds, negative, latents=latents, num_inference_steps=num_steps,
                                     compile=compile, compile_backend=args.compile_backend, fp8=variant.fp8,
                                     step_cache_threshold=variant.step_cache, **settings).frames[0]

    fp8_missing = fp8_unavailable_reason(device)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_bench_adapter(pipe, Path(tmp))
        try:
            with fused_lora(pipe, adapter):
                bench.log(f"generation baseline: stock call, {steps} steps, guidance {guidance}, "
                          f"{preset.num_frames}x{preset.height}x{preset.width}, fused LoRA (warm-up: 1 step)")
                if not args.quick:
                    stock(1)  # warm-up: kernels, allocator, cuDNN plans
                bench.reset_peak()
                bench.sync()
                start = time.perf_counter()
                stock_frames = stock(steps)
                bench.sync()
                stock_s, stock_peak = time.perf_counter() - start, bench.peak_gib()
                bench.log(f"  stock: {stock_s:.2f} s/video, peak {stock_peak} GiB")
                fwd = forward_tflop(pipe, latents, embeds)
                tflop_video = fwd * steps * 2 if fwd else None
                compiled_kinds: set[bool] = set()  # block graphs compiled so far: bf16 (False) / fp8 (True)
                core_frames = None
                for variant in variants:
                    name, compile = variant.name, variant.compile and not args.no_compile
                    if variant.fp8 and fp8_missing:
                        bench.record(name, workload(stock_s, None, None, None, f"skipped: fp8 needs {fp8_missing}"))
                        bench.log(f"{name}: skipped (fp8 needs {fp8_missing})")
                        continue
                    need = (GENERATE_NEED_S + (COMPILE_NEED_S if variant.fp8 not in compiled_kinds else 0) if compile
                            else 2 * GENERATE_NEED_S)
                    if not variant.core and bench.time_left() < need:
                        bench.record(name, workload(stock_s, None, None, None, "skipped: time budget"))
                        bench.log(f"{name}: skipped (time budget)")
                        continue
                    bench.log(f"{name}: fast sampler{' + fp8' if variant.fp8 else ''}"
                              f"{f' + step cache {variant.step_cache:g}' if variant.step_cache is not None else ''}"
                              f"{', regional compile' if compile else ', eager'}; warm-up 1 step")
                    try:
                        ours(1, variant, compile)
                        compiled_kinds.add(variant.fp8)
                        bench.reset_peak()
                        bench.sync()
                        start = time.perf_counter()
                        frames = ours(steps, variant, compile)
                        bench.sync()
                        ours_s, ours_peak = time.perf_counter() - start, bench.peak_gib()
                    except Exception as e:  # recorded; the other variants still run
                        bench.log(traceback.format_exc())
                        error = "out of memory" if isinstance(e, torch.OutOfMemoryError) else _error(e)
                        bench.record(name, workload(stock_s, None, bench.peak_gib(), None, f"{error}; "
                                                    f"{_generation_notes(variant, compile, None)}"))
                        bench.free()
                        continue
                    cache = pipe.flywheel_last_step_cache
                    psnr = psnr_db(stock_frames, frames)
                    extra = {}
                    if variant.core:
                        core_frames = frames
                    elif core_frames is not None:
                        extra["psnr_vs_fast_db"] = round(psnr_db(core_frames, frames), 2)
                    if cache:
                        extra["step_cache"] = {k: cache[k] for k in ("threshold", "computed_steps", "skipped_steps",
                                                                     "computed", "changes")}
                    bench.record(name, workload(
                        stock_s, ours_s, ours_peak, None if cache else tflop_video,
                        _generation_notes(variant, compile, cache), baseline_peak_gib=stock_peak,
                        psnr_db=round(psnr, 2), seconds_per_step=round(ours_s / steps, 3), forward_tflop=fwd, **extra))
                    skipped = (f", skipped {cache['skipped_steps']}/{cache['steps']} steps "
                               f"({''.join('C' if c else '.' for c in cache['computed'])})" if cache else "")
                    bench.log(f"  {name}: {ours_s:.2f} s/video, peak {ours_peak} GiB, PSNR vs stock {psnr:.2f} dB"
                              f"{skipped}")
        finally:
            remove_adapter(pipe, adapter)
            torch._dynamo.reset()  # the training variants compile their own graphs


# --- report -----------------------------------------------------------------------------------


def markdown_table(workloads: dict) -> str:
    head = "| workload | baseline s | ours s | speedup | peak GiB | TFLOP/s | notes |\n|---|---|---|---|---|---|---|"
    rows = []
    for name, w in workloads.items():
        notes = w["notes"]
        for key in ("psnr_db", "psnr_vs_fast_db", "dora_over_lora", "clips_per_minute", "clips_per_minute_shared_prompt"):
            if w.get(key) is not None:
                notes = f"{key}={w[key]}; {notes}"
        rows.append(f"| {name} | {w['baseline_s']} | {w['ours_s']} | {w['speedup']} | {w['peak_gib']} | "
                    f"{w['tflops']} | {notes} |")
    return "\n".join([head, *rows])


def variant_names(args) -> list[str]:
    thresholds = [float(t) for t in args.step_cache_thresholds.split(",") if t.strip()]
    return [PRECOMPUTE] + [v.name for v in generate_variants(thresholds)] + [v.name for v in TRAIN_VARIANTS]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cosmos-predict2.5-2b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--only", default=None,
                        help="comma-separated variant names or prefixes to run, e.g. 'train' (all training), "
                             "'generate_i2w[' (every optional generation variant), "
                             "'train_lora[compile+selective(attention)+fp8]'; the baselines always run; "
                             "--list shows the names")
    parser.add_argument("--skip-core", action="store_true",
                        help="skip the core variants (already measured); baselines still run for the ratios")
    parser.add_argument("--list", action="store_true", help="print the variant names in run order and exit")
    parser.add_argument("--step-cache-thresholds", default=DEFAULT_STEP_CACHE_THRESHOLDS,
                        help="First Block Cache thresholds of the step_cache variants (comma-separated; "
                             "each also runs with fp8)")
    parser.add_argument("--quick", action="store_true", help="fewer reps, no generation warm-up")
    parser.add_argument("--no-compile", action="store_true", help="eager only (CPU smoke runs)")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--budget-s", type=float, default=450.0, help="optional variants stop when this is spent")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from flywheel.model.presets import load_pipeline

    args = parse_args(argv)
    if args.list:
        print("\n".join(variant_names(args)))
        return {}
    bench = Bench(args)
    device = bench.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench.log(f"building {args.preset} on {device} ({gpu_slug(device)})")
    pipe = load_pipeline(args.preset, device=device)
    preset = pipe.flywheel_preset
    tflop_step = REFERENCE_TFLOP_PER_STEP.get(args.preset)
    bench.log(f"built: {preset.num_frames}x{preset.height}x{preset.width}, {preset.dtype}")
    bench.header = dict(
        schema=SCHEMA, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        preset=args.preset, shape=dict(frames=preset.num_frames, height=preset.height, width=preset.width),
        software=software_versions(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        tflop_per_training_step=tflop_step, args=vars(args),
        stem=gpu_slug(device) if args.preset == "cosmos-predict2.5-2b-random" else f"{gpu_slug(device)}-{args.preset}")

    bench_precompute(bench, pipe)
    bench_generation(bench, pipe)
    bench_training(bench, pipe, tflop_step)

    report = bench.report()
    paths = bench.save(report)
    print(markdown_table(bench.workloads))
    bench.log(f"wrote {paths[0]} and {paths[1]}")
    return report


if __name__ == "__main__":
    main()
