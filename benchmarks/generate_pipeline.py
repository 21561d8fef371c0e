"""The pipeline's own generation call, end to end: `generate_videos` with a default `GenerateConfig` vs the stock call.

`benchmarks/cosmos_predict25.py` times the sampler alone. This times what the `synthetic_videos` asset
runs, per video and with everything a user waits for: prompt encoding, sampling, VAE decode, the frames
to uint8, the H.264 mp4, the frame hash, the samples table and the contact sheet.

  baseline   the stock `Cosmos2_5_PredictBasePipeline` call with prompt strings and the LoRA loaded
             through diffusers' `load_lora_weights` (unfused), frames written with the same mp4 writer:
             one video, after a 1-step warm-up
  ours       `generate_videos(pipe, requests, out_dir, GenerateConfig())`: on a CUDA GPU the defaults
             resolve to the fast path (our sampler, compiled blocks, fused LoRA). `--videos` videos from
             one first frame and prompt (seeds 0..K-1) after a 1-video warm-up call (compile);
             seconds per video = the call's wall time / K
  ours+cache the same with `GenerateConfig(step_cache_threshold=T)` (`--step-cache`, 0 skips it)

For each, `sampler_s` is the mean per-video time the samples table records (sampling, decode and the
uint8 copy); the rest of the wall time is what the pipeline adds around the sampler. `psnr_db` compares
the seed-0 video with the baseline's (both decoded from their mp4s: same encoder, same initial noise).

Usage (writes <out>/pipeline-generate-<gpu>.json and .md):

    python benchmarks/generate_pipeline.py --out benchmarks/results
    python benchmarks/generate_pipeline.py --preset tiny --device cpu --videos 2 --out /tmp/bench   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from benchmarks.cosmos_predict25 import (  # noqa: E402
    PROMPT,
    SCHEMA,
    Bench,
    gpu_slug,
    make_bench_adapter,
    psnr_db,
    software_versions,
    workload,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cosmos-predict2.5-2b-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--videos", type=int, default=3, help="timed videos per generate_videos call")
    parser.add_argument("--step-cache", type=float, default=0.05, help="threshold of the cached run; 0: skip it")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args(argv)


def stock_call(pipe, image, steps: int, out: Path, fps: int) -> Path:
    """What a diffusers user writes: the pipeline call with prompt strings, then the frames to an mp4."""
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

    from flywheel.data.video import write_video

    preset = pipe.flywheel_preset
    frames = pipe(image=image, prompt=PROMPT, negative_prompt=DEFAULT_NEGATIVE_PROMPT, height=preset.height,
                  width=preset.width, num_frames=preset.num_frames, num_inference_steps=steps,
                  guidance_scale=preset.guidance_scale, generator=torch.Generator().manual_seed(0),
                  max_sequence_length=preset.max_sequence_length, output_type="np").frames[0]
    return write_video(out, (np.clip(frames, 0, 1) * 255).round().astype(np.uint8), fps=fps)


def pipeline_call(pipe, first_frame: Path, count: int, out: Path, config, adapters: dict):
    from flywheel.generate.world import GenerationRequest, generate_videos

    requests = [GenerationRequest(request_id=f"v{seed:03d}", first_frame=first_frame, prompt=PROMPT, seed=seed,
                                  adapter="bench") for seed in range(count)]
    return generate_videos(pipe, requests, out, config, adapters=adapters, progress=lambda _: None)


def main(argv=None) -> dict:
    from PIL import Image

    from flywheel.data.video import read_frames
    from flywheel.generate.config import GenerateConfig
    from flywheel.generate.world import load_adapters, unload_adapters, use_adapter
    from flywheel.model.presets import load_pipeline
    from flywheel.train.adapter_io import remove_adapter

    args = parse_args(argv)
    bench = Bench(argparse.Namespace(device=args.device, budget_s=float("inf"), out=args.out))
    device = bench.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench.log(f"building {args.preset} on {device}")
    pipe = load_pipeline(args.preset, device=device)
    preset = pipe.flywheel_preset
    steps = preset.num_inference_steps
    workloads: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="generate-pipeline-bench-") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8)).save(tmp / "first.png")
        remove_adapter(pipe, make_bench_adapter(pipe, tmp))  # writes tmp/bench-lora
        adapters = {"bench": tmp / "bench-lora"}
        image = Image.open(tmp / "first.png").convert("RGB")

        load_adapters(pipe, adapters)
        use_adapter(pipe, "bench")
        stock_call(pipe, image, 1, tmp / "warmup.mp4", preset.fps)  # kernels, allocator, cuDNN plans
        bench.reset_peak()
        bench.sync()
        started = time.perf_counter()
        stock_mp4 = stock_call(pipe, image, steps, tmp / "stock.mp4", preset.fps)
        bench.sync()
        stock_s, stock_peak = time.perf_counter() - started, bench.peak_gib()
        stock_frames = read_frames(stock_mp4).astype(np.float32) / 255
        bench.log(f"stock call + mp4: {stock_s:.2f} s/video, peak {stock_peak} GiB")

        runs = [("generate_videos", GenerateConfig())]
        if args.step_cache > 0:
            runs.append((f"generate_videos[step_cache={args.step_cache:g}]",
                         GenerateConfig(step_cache_threshold=args.step_cache)))
        for name, config in runs:
            resolved = config.resolved(preset, device)
            pipeline_call(pipe, tmp / "first.png", 1, tmp / f"{name}-warmup", config, adapters)  # compile
            bench.reset_peak()
            bench.sync()
            started = time.perf_counter()
            result = pipeline_call(pipe, tmp / "first.png", args.videos, tmp / name, config, adapters)
            bench.sync()
            wall = (time.perf_counter() - started) / args.videos
            sampler_s = float(result.frame["seconds"].mean())
            psnr = psnr_db(stock_frames, read_frames(result.out_dir / "videos" / "v000.mp4").astype(np.float32) / 255)
            cache = getattr(pipe, "flywheel_last_step_cache", None) if config.step_cache_threshold else None
            notes = (f"generate_videos over {args.videos} videos, resolved on {device.type}: sampler={resolved.sampler}, "
                     f"compile={resolved.compile}, fuse_lora={resolved.fuse_lora}"
                     + (f", step cache {config.step_cache_threshold:g}" if config.step_cache_threshold else "")
                     + "; baseline: stock call with prompt strings, unfused LoRA, same mp4 writer")
            workloads[name] = workload(stock_s, wall, bench.peak_gib(), None, notes, baseline_peak_gib=stock_peak,
                                       sampler_s=sampler_s, pipeline_overhead_s=wall - sampler_s,
                                       psnr_db=round(psnr, 2), steps=steps,
                                       **({"skipped_steps": cache["skipped_steps"]} if cache else {}))
            bench.log(f"{name}: {wall:.2f} s/video wall, sampler {sampler_s:.2f} s, PSNR vs stock {psnr:.2f} dB")
        unload_adapters(pipe)

    report = dict(schema=SCHEMA, gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  preset=args.preset, shape=dict(frames=preset.num_frames, height=preset.height, width=preset.width),
                  software=software_versions(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  args=vars(args), workloads=workloads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"pipeline-generate-{gpu_slug(device)}" + ("" if args.preset == "cosmos-predict2.5-2b-random"
                                                       else f"-{args.preset}")
    head = ("| workload | stock s/video | ours s/video | speedup | sampler s | pipeline overhead s | PSNR dB | peak GiB |"
            "\n|---|---|---|---|---|---|---|---|")
    rows = [f"| {n} | {w['baseline_s']} | {w['ours_s']} | {w['speedup']} | {w['sampler_s']} | "
            f"{w['pipeline_overhead_s']} | {w['psnr_db']} | {w['peak_gib']} |" for n, w in workloads.items()]
    table = "\n".join([head, *rows])
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(f"# {report['gpu']} {args.preset} ({report['date']})\n\n{table}\n")
    print(table)
    bench.log(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return report


if __name__ == "__main__":
    main()
