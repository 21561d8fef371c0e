"""Cosmos Predict 2.5 LoRA/DoRA training step and image-to-world generation: stock baseline vs our code paths.

One process, one set of random weights (preset `cosmos-predict2.5-2b-random`: the real 2B DiT, Qwen2.5-VL-7B
and Wan2.1 VAE shapes), bf16, batch 1, 93 frames at 432x768, LoRA r=32:

  training   baseline: the recipe's per-step work (VAE encode of the clip + text encode of the prompt +
             eager DiT step with full gradient checkpointing, AdamW);
             ours: flywheel.train.lora.training_step on precomputed latents/embeddings, with
             flywheel.train.speed settings (checkpointing none/full/selective, regional compile, fused AdamW),
             LoRA and DoRA. Each variant runs in try/except: an out-of-memory is a result, not a crash.
  generation baseline: the stock pipeline call (prompt strings, 36 steps, guidance 7) with a fused LoRA;
             ours: flywheel.generate.sampler (cond+uncond batched, embeddings precomputed, first-frame
             encode, regional compile, fused LoRA) from the same initial latents; PSNR between the two.

Writes <out>/<gpu-slug>.json and <out>/<gpu-slug>.md and prints the table. Usage (GPU, ~8 min):

    python benchmarks/cosmos_predict25.py --out benchmarks/results
    python benchmarks/cosmos_predict25.py --preset tiny --device cpu --quick --no-compile --out /tmp/b  # smoke

The core workloads run first; optional variants only while the time budget (--budget-s) lasts.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

# Model FLOPs of one training step of the 2B at 93x432x768 (reference/h200_cosmos_lora.json).
REFERENCE_TFLOP_PER_STEP = {"cosmos-predict2.5-2b-random": 881.7, "cosmos-predict2.5-2b": 881.7}
TARGET_PEAK_GIB = 80.0
PROMPT = ("A humanoid robot stands at a table, reaches for the yellow bottle with its right hand, grasps it "
          "and lifts it, while the camera stays still.")
SCHEMA = "flywheel-benchmark/1"


@dataclasses.dataclass(frozen=True)
class TrainVariant:
    method: str  # lora | dora
    checkpointing: str  # none | full | selective
    save: str = "attention"  # what selective keeps
    compile: bool = False
    core: bool = True  # core variants always run; the rest while the budget lasts

    @property
    def name(self) -> str:
        ckpt = f"selective({self.save})" if self.checkpointing == "selective" else self.checkpointing
        return f"train_{self.method}[{'compile' if self.compile else 'eager'}+{ckpt}]"


TRAIN_VARIANTS = [
    TrainVariant("lora", "full"),
    TrainVariant("lora", "selective", compile=True),
    TrainVariant("dora", "selective", compile=True),
    TrainVariant("lora", "full", compile=True, core=False),
    TrainVariant("lora", "selective", save="attention_matmul", compile=True, core=False),
    TrainVariant("lora", "none", compile=True, core=False),
    TrainVariant("dora", "full", core=False),
]


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.started = time.perf_counter()
        self.workloads: dict[str, dict] = {}
        self.baseline_train: dict | None = None  # the recipe step, measured once
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # its latents + embeddings, reused by our path

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


def gpu_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def software_versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "cuda": torch.version.cuda,
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


# --- training ---------------------------------------------------------------------------------


def train_config(method: str, checkpointing: str, save: str = "attention", compile: bool = False,
                 compile_backend: str = "inductor", fused: bool | None = None):
    from flywheel.train.config import TrainConfig

    return TrainConfig(method=method, rank=32, alpha=32, steps=10_000, activation_checkpointing=checkpointing,
                       selective_save=save, compile=compile, compile_backend=compile_backend, fused_optimizer=fused)


def run_training(bench: Bench, pipe, config, batch_fn, warmup: int, reps: int) -> dict:
    """Time training_step (our code path) under `config`; the adapter is removed and the compile cache reset after."""
    from flywheel.train.adapter_io import remove_adapter
    from flywheel.train.lora import add_training_adapter, training_step
    from flywheel.train.speed import apply_training_speedups, build_optimizer_and_scheduler

    transformer = pipe.transformer
    preset = pipe.flywheel_preset
    padding_mask = torch.zeros(1, 1, preset.height, preset.width, device=bench.device)
    generator = torch.Generator(device=bench.device).manual_seed(0)
    params = add_training_adapter(transformer, config)
    optimizer, scheduler = build_optimizer_and_scheduler(params, config, bench.device)
    undo = apply_training_speedups(transformer, config)
    transformer.train()
    losses = []

    def step():
        latents, embeds = batch_fn()
        losses.append(training_step(transformer, params, optimizer, scheduler, latents, embeds, padding_mask,
                                    generator, config)["loss"])

    result = dict(seconds=None, peak_gib=None, error=None)
    try:
        seconds, peak, times = bench.measure(step, warmup, reps)
        result.update(seconds=seconds, peak_gib=peak, times=[round(t, 3) for t in times],
                      finite=all(math.isfinite(x) for x in losses))
    except torch.OutOfMemoryError:
        result.update(error="out of memory", peak_gib=bench.peak_gib())
    finally:
        undo()
        remove_adapter(pipe)
        transformer.eval()
        del optimizer, scheduler, params
        bench.free()
        torch._dynamo.reset()  # each variant compiles its own graphs; keep Dynamo's recompile budget for the next
    return result


def bench_training(bench: Bench, pipe, tflop_per_step: float | None, optional: bool) -> None:
    args = bench.args
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

    if not bench.baseline_train:
        bench.log(f"training baseline: recipe step (VAE encode {tuple(video.shape)} + text encode "
                  f"{preset.max_sequence_length} tokens + eager DiT step, full checkpointing), {reps} reps")
        result = run_training(bench, pipe, train_config("lora", "full", fused=False), encode, 1, reps)
        bench.baseline_train = result
        bench.log(f"  recipe step {result['seconds']} s, peak {result['peak_gib']} GiB {result['error'] or ''}")
        bench.batch = encode()
        # Our path never needs the text encoder or VAE while training: off the GPU, as with a latent cache.
        pipe.text_encoder.to("cpu")
        pipe.vae.to("cpu")
        bench.free()

    baseline = bench.baseline_train
    for variant in TRAIN_VARIANTS:
        if variant.core == optional:
            continue
        if variant.compile and args.no_compile:
            variant = dataclasses.replace(variant, compile=False)
        name = variant.name
        if name in bench.workloads:
            continue
        if optional and bench.time_left() < (120 if variant.compile else 40):
            bench.workloads[name] = workload(baseline["seconds"], None, None, None, "skipped: time budget")
            bench.log(f"{name}: skipped (time budget)")
            continue
        bench.log(f"{name}: warm-up{' (compile)' if variant.compile else ''} + {reps} reps")
        config = train_config(variant.method, variant.checkpointing, variant.save, variant.compile,
                              args.compile_backend)
        result = run_training(bench, pipe, config, lambda: bench.batch, 2 if variant.compile else 1, reps)
        notes = ("precomputed latents+embeddings, fused AdamW" if device.type == "cuda" else "precomputed latents+embeddings")
        if result["error"]:
            notes = f"{result['error']}; {notes}"
        extra = {}
        if variant.method == "dora":
            lora_name = dataclasses.replace(variant, method="lora").name
            lora_s = bench.workloads.get(lora_name, {}).get("ours_s")
            if lora_s and result["seconds"]:
                extra["dora_over_lora"] = round(result["seconds"] / lora_s, 3)
        bench.workloads[name] = workload(baseline["seconds"], result["seconds"], result["peak_gib"], tflop_per_step,
                                         notes, baseline_peak_gib=baseline["peak_gib"], times=result.get("times"),
                                         **extra)
        bench.log(f"  {name}: {result['seconds']} s, peak {result['peak_gib']} GiB {result['error'] or ''}")
    best = best_training(bench.workloads, "lora")
    if best:
        bench.workloads["train_lora"] = dict(bench.workloads[best], notes=f"best: {best}")
    best_dora = best_training(bench.workloads, "dora")
    if best_dora:
        bench.workloads["train_dora"] = dict(bench.workloads[best_dora], notes=f"best: {best_dora}")


def best_training(workloads: dict, method: str) -> str | None:
    """The fastest measured variant that fits the memory target."""
    fits = [(w["ours_s"], name) for name, w in workloads.items()
            if name.startswith(f"train_{method}[") and w["ours_s"]
            and (w["peak_gib"] is None or w["peak_gib"] <= TARGET_PEAK_GIB)]
    return min(fits)[1] if fits else None


# --- generation -------------------------------------------------------------------------------


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two float videos in [0, 1]; 100 dB stands for identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(1.0 / mse))


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
    from flywheel.train.adapter_io import load_adapter, remove_adapter, save_adapter
    from flywheel.train.lora import add_training_adapter

    transformer = pipe.transformer
    add_training_adapter(transformer, train_config("lora", "none"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 1e-3)
    save_adapter(transformer, root / "bench-lora", {"rank": 32, "alpha": 32, "method": "lora"})
    remove_adapter(pipe)
    load_adapter(pipe, root / "bench-lora", "bench")
    return "bench"


def bench_generation(bench: Bench, pipe) -> None:
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT
    from PIL import Image

    from flywheel.generate.sampler import fused_lora, sample_image_to_world
    from flywheel.train.adapter_io import remove_adapter

    args = bench.args
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

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_bench_adapter(pipe, Path(tmp))
        try:
            with fused_lora(pipe, adapter):
                def stock(num_steps: int):
                    return pipe(image=image, prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, latents=latents,
                                num_inference_steps=num_steps, max_sequence_length=preset.max_sequence_length,
                                **settings).frames[0]

                def ours(num_steps: int, compile: bool):
                    return sample_image_to_world(pipe, image, embeds, negative, latents=latents,
                                                 num_inference_steps=num_steps, compile=compile,
                                                 compile_backend=args.compile_backend, **settings).frames[0]

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

                variants = [("generate_i2w", not args.no_compile)]
                if not args.no_compile:
                    variants.append(("generate_i2w[eager]", False))
                for name, compile in variants:
                    if name != "generate_i2w" and bench.time_left() < 100:  # the eager run: ~50 s at 2B
                        bench.workloads[name] = workload(stock_s, None, None, None, "skipped: time budget")
                        continue
                    bench.log(f"{name}: fast sampler (batched cond+uncond, precomputed embeddings, first-frame "
                              f"encode, fused LoRA{', regional compile' if compile else ''}); warm-up 1 step")
                    ours(1, compile)
                    bench.reset_peak()
                    bench.sync()
                    start = time.perf_counter()
                    frames = ours(steps, compile)
                    bench.sync()
                    ours_s, ours_peak = time.perf_counter() - start, bench.peak_gib()
                    psnr = psnr_db(stock_frames, frames)
                    bench.log(f"  {name}: {ours_s:.2f} s/video, peak {ours_peak} GiB, PSNR vs stock {psnr:.2f} dB")
                    bench.workloads[name] = dict(ours_s=ours_s, peak=ours_peak, psnr=psnr)
                    torch._dynamo.reset()
                fwd = forward_tflop(pipe, latents, embeds)
        finally:
            remove_adapter(pipe, adapter)
    tflop_video = fwd * steps * 2 if fwd else None
    for name, _ in variants:
        got = bench.workloads[name]
        if "psnr" not in got:
            continue
        bench.workloads[name] = workload(
            stock_s, got["ours_s"], got["peak"], tflop_video,
            "baseline: stock call with prompt strings (text encode included); ours: embeddings encoded once per "
            "prompt (excluded); tflops counts the DiT forwards only (2 per step)",
            baseline_peak_gib=stock_peak, psnr_db=round(got["psnr"], 2),
            seconds_per_step=round(got["ours_s"] / steps, 3), forward_tflop=fwd)


# --- report -----------------------------------------------------------------------------------


def markdown_table(workloads: dict) -> str:
    head = "| workload | baseline s | ours s | speedup | peak GiB | TFLOP/s | notes |\n|---|---|---|---|---|---|---|"
    rows = []
    for name, w in workloads.items():
        notes = w["notes"]
        for key in ("psnr_db", "dora_over_lora"):
            if w.get(key) is not None:
                notes = f"{key}={w[key]}; {notes}"
        rows.append(f"| {name} | {w['baseline_s']} | {w['ours_s']} | {w['speedup']} | {w['peak_gib']} | "
                    f"{w['tflops']} | {notes} |")
    return "\n".join([head, *rows])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cosmos-predict2.5-2b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--only", choices=["train", "generate"], default=None)
    parser.add_argument("--quick", action="store_true", help="fewer reps, no generation warm-up")
    parser.add_argument("--no-compile", action="store_true", help="eager only (CPU smoke runs)")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--budget-s", type=float, default=450.0, help="optional variants stop when this is spent")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from flywheel.model.presets import load_pipeline

    args = parse_args(argv)
    bench = Bench(args)
    device = bench.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench.log(f"building {args.preset} on {device} ({gpu_slug(device)})")
    pipe = load_pipeline(args.preset, device=device)
    preset = pipe.flywheel_preset
    tflop_step = REFERENCE_TFLOP_PER_STEP.get(args.preset)
    bench.log(f"built: {preset.num_frames}x{preset.height}x{preset.width}, {preset.dtype}")

    if args.only in (None, "train"):
        bench_training(bench, pipe, tflop_step, optional=False)
    if args.only in (None, "generate"):
        bench_generation(bench, pipe)
    if args.only in (None, "train"):
        bench_training(bench, pipe, tflop_step, optional=True)

    report = dict(schema=SCHEMA, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  preset=args.preset, shape=dict(frames=preset.num_frames, height=preset.height, width=preset.width),
                  software=software_versions(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  tflop_per_training_step=tflop_step, wall_s=round(time.perf_counter() - bench.started, 1),
                  args=vars(args), workloads=bench.workloads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = gpu_slug(device) if args.preset == "cosmos-predict2.5-2b-random" else f"{gpu_slug(device)}-{args.preset}"
    table = markdown_table(bench.workloads)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(f"# {report['gpu']} {args.preset} ({report['date']})\n\n{table}\n")
    print(table)
    bench.log(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return report


if __name__ == "__main__":
    main()
