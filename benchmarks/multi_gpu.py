"""Several GPUs of one host: data-parallel LoRA training and fanned-out image-to-world generation, 1 GPU vs N.

The script launches itself under torchrun twice, with 1 and with N processes (one per GPU), on the same
random weights of the real shapes (`cosmos-predict2.5-2b-random`), bf16, 93 frames at 432x768, LoRA r=32:

  training    flywheel.train.lora.training_step with the pipeline's speedups (flywheel.train.speed:
              regional compile + selective checkpointing, fused AdamW), per-GPU batch 1 (global batch N),
              adapter gradients averaged over the ranks every step. Median step time t1 (1 GPU) and tN
              (N GPUs); weak scaling: scaling_efficiency = t1 / tN (1.0 = perfect), speedup = N * t1 / tN
              (clips per second vs one GPU).
  generation  flywheel.generate.world.generate_videos (fast sampler, regional compile, fused LoRA) on
              `--videos-per-gpu` x N requests split over the ranks; after a warm-up call (compile), the wall
              time of one call gives videos per hour; speedup = videos/hour at N GPUs / at 1 GPU.
              `--gen-steps` shortens the denoising loop (labelled in the results).

Writes <out>/<gpu-slug>-x<N>.json and .md (schema of benchmarks/results/nvidia-h200.json, plus
scaling_efficiency) and prints the table. Usage:

    python benchmarks/multi_gpu.py --out benchmarks/results                  # N = all visible GPUs
    python benchmarks/multi_gpu.py --gpus 4 --gen-steps 12 --out /tmp/bench
    python benchmarks/multi_gpu.py --dry-run --out /tmp/bench                # CPU, tiny preset, 2 gloo processes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script

from benchmarks.cosmos_predict25 import (  # noqa: E402
    PROMPT,
    REFERENCE_TFLOP_PER_STEP,
    SCHEMA,
    Bench,
    gpu_slug,
    make_bench_adapter,
    software_versions,
    train_config,
    workload,
)

DRY_RUN = dict(preset="tiny", device="cpu", gpus=2, no_compile=True, compile_backend="aot_eager", warmup=1, reps=2,
               gen_steps=2, videos_per_gpu=1)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=None, help="N; default: every visible GPU (torch.cuda.device_count())")
    parser.add_argument("--preset", default="cosmos-predict2.5-2b-random")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo processes (smoke runs)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--only", choices=["train", "generate"], default=None)
    parser.add_argument("--checkpointing", default="selective", choices=["none", "full", "selective"])
    parser.add_argument("--selective-save", default="attention_matmul", choices=["attention", "attention_matmul"],
                        help="what selective checkpointing keeps (attention_matmul: the fastest mode under 80 GiB)")
    parser.add_argument("--no-autocast", action="store_true", help="fp32 adapter products (train.autocast false)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"])
    parser.add_argument("--warmup", type=int, default=2, help="untimed training steps (compile)")
    parser.add_argument("--reps", type=int, default=5, help="timed training steps")
    parser.add_argument("--gen-steps", type=int, default=None, help="denoising steps; default: the preset's (36)")
    parser.add_argument("--videos-per-gpu", type=int, default=2, help="timed videos per GPU")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke test: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DRY_RUN.items()))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set for the torchrun ranks
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        for key, value in DRY_RUN.items():
            setattr(args, key, value)
    if args.gpus is None:
        args.gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.gpus < 1 or (args.device == "cuda" and not args.worker and args.gpus > torch.cuda.device_count()):
        parser.error(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} visible GPU(s)")
    return args


# --- the ranks (under torchrun) -----------------------------------------------------------------


def bench_training(bench: Bench, pipe, world, args) -> dict:
    """Median seconds of training_step on this rank's batch of 1 (the global batch is world_size)."""
    from flywheel.train.adapter_io import remove_adapter
    from flywheel.train.lora import add_training_adapter, training_step
    from flywheel.train.speed import apply_training_speedups, build_optimizer_and_scheduler

    preset, device, transformer = pipe.flywheel_preset, bench.device, pipe.transformer
    config = train_config("lora", args.checkpointing, save=args.selective_save, compile=not args.no_compile,
                          compile_backend=args.compile_backend, autocast=not args.no_autocast)
    config = config.model_copy(update={"batch_size": world.world_size})
    generator = torch.Generator().manual_seed(100 + world.rank)  # this rank's clip (a latent cache would give one)
    latent_shape = (1, transformer.config.in_channels - 1, (preset.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
                    preset.height // pipe.vae_scale_factor_spatial, preset.width // pipe.vae_scale_factor_spatial)
    latents = torch.randn(latent_shape, generator=generator).to(device)
    with torch.no_grad():
        embeds = pipe._get_prompt_embeds(PROMPT, max_sequence_length=preset.max_sequence_length, device=device).float()
    padding_mask = torch.zeros(1, 1, preset.height, preset.width, device=device)
    noise = torch.Generator(device=device).manual_seed(config.seed + 1)
    params = add_training_adapter(transformer, config)
    optimizer, scheduler = build_optimizer_and_scheduler(params, config, device)
    undo = apply_training_speedups(transformer, config)
    transformer.train()
    losses = []

    def step():
        losses.append(training_step(transformer, params, optimizer, scheduler, latents, embeds, padding_mask, noise,
                                    config, world)["loss"])

    try:
        with torch.enable_grad():
            seconds, peak, times = bench.measure(step, args.warmup, args.reps)
    finally:
        undo()
        remove_adapter(pipe)
        transformer.eval()
        del optimizer, scheduler, params
        bench.free()
    return dict(seconds=seconds, peak_gib=peak, times=[round(t, 3) for t in times],
                finite=bool(np.isfinite(losses).all()), global_batch=config.batch_size)


def bench_generation(bench: Bench, pipe, world, args, work_dir: Path) -> dict:
    """Wall seconds of one generate_videos call over videos_per_gpu x world_size requests (after a warm-up call)."""
    from PIL import Image

    from flywheel.generate.config import GenerateConfig
    from flywheel.generate.world import GenerationRequest, generate_videos, unload_adapters
    from flywheel.train.adapter_io import remove_adapter

    preset = pipe.flywheel_preset
    if world.is_main:
        image = np.random.default_rng(0).integers(0, 256, (preset.height, preset.width, 3), dtype=np.uint8)
        Image.fromarray(image).save(work_dir / "first_frame.png")
        remove_adapter(pipe, make_bench_adapter(pipe, work_dir))  # writes work_dir/bench-lora
    world.barrier()
    config = GenerateConfig(num_inference_steps=args.gen_steps, sampler="fast", compile=not args.no_compile,
                            fuse_lora=True)
    steps = config.resolved(preset).num_inference_steps

    def requests(tag: str, count: int) -> list[GenerationRequest]:
        return [GenerationRequest(request_id=f"{tag}-{i:03d}", first_frame=work_dir / "first_frame.png", prompt=PROMPT,
                                  seed=i, adapter="bench") for i in range(count)]

    adapters = {"bench": work_dir / "bench-lora"}
    try:
        generate_videos(pipe, requests("warmup", world.world_size), work_dir / "warmup" if world.is_main else None,
                        config, adapters=adapters, progress=lambda _: None)  # compile, kernels, allocator
        bench.reset_peak()
        count = args.videos_per_gpu * world.world_size
        world.barrier()
        bench.sync()
        started = time.perf_counter()
        result = generate_videos(pipe, requests("timed", count), work_dir / "timed" if world.is_main else None, config,
                                 adapters=adapters, progress=lambda _: None)
        bench.sync()
        seconds = time.perf_counter() - started
    finally:
        unload_adapters(pipe)
    return dict(seconds=seconds, videos=len(result.frame), steps=steps, peak_gib=bench.peak_gib(),
                videos_per_hour=round(len(result.frame) / seconds * 3600, 2))


def run_rank(args) -> None:
    """One torchrun rank: both workloads; rank 0 writes what every rank measured."""
    from flywheel.model.presets import load_pipeline
    from flywheel.train.distributed import init_world, shutdown_world

    world = init_world(args.device)
    if world.device.type == "cpu":
        torch.set_num_threads(1)
    bench = Bench(argparse.Namespace(device=str(world.device), budget_s=float("inf")))
    if world.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    pipe = load_pipeline(args.preset, device=world.device)
    measured: dict = {"processes": world.world_size}
    if args.only in (None, "train"):
        measured["train"] = world.all_gather_object(bench_training(bench, pipe, world, args))
    if args.only in (None, "generate"):
        measured["generate"] = world.all_gather_object(bench_generation(bench, pipe, world, args, Path(args.work_dir)))
    if world.is_main:
        preset = pipe.flywheel_preset
        measured.update(gpu=torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu",
                        slug=gpu_slug(world.device),
                        shape=dict(frames=preset.num_frames, height=preset.height, width=preset.width))
        Path(args.result_file).write_text(json.dumps(measured, indent=2))
    shutdown_world()


# --- the launcher -------------------------------------------------------------------------------


def launch(args, processes: int, work_dir: Path) -> dict:
    """Run this script under torchrun with `processes` ranks; returns rank 0's measurements."""
    result_file = work_dir / f"x{processes}.json"
    (work_dir / f"x{processes}").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(Path(__file__).resolve()), *_settings_as_flags(args), "--worker",
               "--result-file", str(result_file), "--work-dir", str(work_dir / f"x{processes}")]
    env = dict(os.environ)
    if args.device == "cuda":
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = ",".join((visible or [str(i) for i in range(torch.cuda.device_count())])[:processes])
    print(f"[{datetime.datetime.now():%H:%M:%S}] {processes} process(es): {' '.join(command[1:7])} ...", flush=True)
    subprocess.run(command, env=env, check=True)
    return json.loads(result_file.read_text())


def _settings_as_flags(args) -> list[str]:
    flags = ["--preset", args.preset, "--device", args.device, "--checkpointing", args.checkpointing,
             "--selective-save", args.selective_save,
             "--compile-backend", args.compile_backend, "--warmup", str(args.warmup), "--reps", str(args.reps),
             "--videos-per-gpu", str(args.videos_per_gpu), "--gpus", str(args.gpus)]
    if args.gen_steps is not None:
        flags += ["--gen-steps", str(args.gen_steps)]
    if args.no_compile:
        flags.append("--no-compile")
    if args.no_autocast:
        flags.append("--no-autocast")
    if args.only:
        flags += ["--only", args.only]
    return flags


def _nccl_version() -> str | None:
    return ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def summarize(one: dict, many: dict, args) -> dict:
    """The workloads table: 1 GPU is the baseline, N GPUs is ours."""
    n = many["processes"]
    workloads = {}
    if "train" in one:
        t1 = _max(r["seconds"] for r in one["train"])  # a step ends when the slowest rank's does
        tn = _max(r["seconds"] for r in many["train"])
        tflop = REFERENCE_TFLOP_PER_STEP.get(args.preset)
        name = f"train_lora[x{n}]"
        workloads[name] = workload(
            t1, tn, _max(r["peak_gib"] for r in many["train"]), tflop * n if tflop else None,
            f"seconds per step, per-GPU batch 1 (global batch {n} vs 1), {args.checkpointing} checkpointing"
            f"{f' ({args.selective_save})' if args.checkpointing == 'selective' else ''}"
            f"{'' if args.no_compile else ' + regional compile'}{'' if args.no_autocast else ' + autocast'}, "
            "adapter gradients all-reduced every step; "
            "speedup = clips/s vs 1 GPU; scaling_efficiency = t1 / tN",
            gpus=n, scaling_efficiency=t1 / tn, baseline_peak_gib=_max(r["peak_gib"] for r in one["train"]),
            times=many["train"][0]["times"], baseline_times=one["train"][0]["times"],
            finite=all(r["finite"] for r in one["train"] + many["train"]))
        workloads[name]["speedup"] = round(n * t1 / tn, 3)
    if "generate" in one:
        g1, gn = one["generate"][0], many["generate"][0]
        s1, sn = g1["seconds"] / g1["videos"], gn["seconds"] / gn["videos"]
        steps = gn["steps"]
        label = "" if args.gen_steps is None else f", shortened to {steps} steps (--gen-steps)"
        workloads[f"generate_i2w[x{n}]"] = workload(
            s1, sn, _max(r["peak_gib"] for r in many["generate"]), None,
            f"wall seconds per video over {gn['videos']} videos on {n} GPUs vs {g1['videos']} on 1 (generate_videos: "
            f"fast sampler, fused LoRA{'' if args.no_compile else ', regional compile'}{label}); "
            "speedup = videos/hour vs 1 GPU",
            gpus=n, steps=steps, videos_per_hour=gn["videos_per_hour"], baseline_videos_per_hour=g1["videos_per_hour"],
            scaling_efficiency=s1 / sn / n, baseline_peak_gib=_max(r["peak_gib"] for r in one["generate"]))
    return workloads


def markdown_table(workloads: dict) -> str:
    head = ("| workload | 1 GPU s | N GPUs s | speedup | scaling efficiency | peak GiB | notes |\n"
            "|---|---|---|---|---|---|---|")
    rows = [f"| {name} | {w['baseline_s']} | {w['ours_s']} | {w['speedup']} | {w['scaling_efficiency']} | "
            f"{w['peak_gib']} | {w['notes']} |" for name, w in workloads.items()]
    return "\n".join([head, *rows])


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        run_rank(args)
        return None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="multi-gpu-bench-") as tmp:
        one = launch(args, 1, Path(tmp))
        many = launch(args, args.gpus, Path(tmp))
    workloads = summarize(one, many, args)
    report = dict(schema=SCHEMA, gpu=many["gpu"], gpus=args.gpus, preset=args.preset, shape=many["shape"],
                  software={**software_versions(), "nccl": _nccl_version()},
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  wall_s=round(time.perf_counter() - started, 1),
                  args={k: v for k, v in vars(args).items() if k not in ("worker", "result_file", "work_dir")},
                  workloads=workloads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{many['slug']}-x{args.gpus}" + ("" if args.preset == "cosmos-predict2.5-2b-random" else f"-{args.preset}")
    if args.only and (out / f"{stem}.json").exists():  # `--only train` then `--only generate`: one results file
        earlier = json.loads((out / f"{stem}.json").read_text())
        report["workloads"] = workloads = {**earlier.get("workloads", {}), **workloads}
        report["runs"] = [*earlier.get("runs", [dict(date=earlier.get("date"), args=earlier.get("args"))]),
                          dict(date=report["date"], args=report["args"])]
    table = markdown_table(workloads)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(f"# {report['gpu']} x{args.gpus} {args.preset} ({report['date']})\n\n{table}\n")
    print(table)
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.md'}")
    return report


if __name__ == "__main__":
    main()
