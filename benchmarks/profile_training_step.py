"""Where one LoRA training step's GPU time goes: a torch.profiler trace of flywheel's training_step, by kernel kind.

Builds the random-weight 2B (`cosmos-predict2.5-2b-random`), takes the fastest configuration that fits
80 GiB (regional compile + selective checkpointing that keeps attention and large projection outputs),
warms up, profiles one step and sums CUDA kernel time into kinds (attention forward/backward, matmul,
compiled elementwise, optimizer, other). Prints the table and writes <out>/profile-<config>.json (+ the
Chrome trace). GPU only.

    python benchmarks/profile_training_step.py --out $OUT [--save attention] [--fp8] [--no-autocast] [--no-compile]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "A humanoid robot reaches for the yellow bottle with its right hand."
KINDS = (  # first match wins; kernel names as cuDNN / cuBLAS / Inductor name them on Hopper
    ("attention backward", ("flash_bprop", "bprop", "dgrad", "attention_backward", "fmha_bwd", "_bwd")),
    ("attention forward", ("flash_fprop", "fprop", "fmha", "attention_forward", "sdpa")),
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "_scaled_mm")),
    ("optimizer", ("adam", "multi_tensor")),
    ("compiled elementwise/reduction", ("triton_",)),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def main(argv=None) -> dict:
    from flywheel.model.presets import load_pipeline
    from flywheel.train.adapter_io import remove_adapter
    from flywheel.train.config import TrainConfig
    from flywheel.train.lora import add_training_adapter, training_step
    from flywheel.train.speed import apply_training_speedups, build_optimizer_and_scheduler

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="/tmp/profile")
    p.add_argument("--save", default="attention_matmul", choices=["attention", "attention_matmul"])
    p.add_argument("--checkpointing", default="selective", choices=["none", "full", "selective"])
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-autocast", action="store_true", help="TrainConfig.autocast=False: the adapter in fp32")
    args = p.parse_args(argv)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    pipe = load_pipeline("cosmos-predict2.5-2b-random", device=device)
    preset = pipe.flywheel_preset
    with torch.no_grad():
        embeds = pipe._get_prompt_embeds(PROMPT, max_sequence_length=preset.max_sequence_length, device=device)
    pipe.text_encoder.to("cpu")
    pipe.vae.to("cpu")
    torch.cuda.empty_cache()
    t, h, w = (preset.num_frames - 1) // 4 + 1, preset.height // 8, preset.width // 8
    latents = torch.randn(1, 16, t, h, w, device=device)
    config = TrainConfig(method="lora", rank=32, alpha=32, steps=10_000, activation_checkpointing=args.checkpointing,
                         selective_save=args.save, compile=not args.no_compile, fp8=args.fp8,
                         autocast=not args.no_autocast)
    transformer = pipe.transformer
    params = add_training_adapter(transformer, config)
    optimizer, scheduler = build_optimizer_and_scheduler(params, config, device)
    undo = apply_training_speedups(transformer, config)
    transformer.train()
    padding_mask = torch.zeros(1, 1, preset.height, preset.width, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        return training_step(transformer, params, optimizer, scheduler, latents, embeds, padding_mask, generator,
                             config)["loss"]

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = collections.defaultdict(float)
    per_kernel: dict[str, float] = collections.defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            per_kind[kind_of(event.name)] += us / 1e6
            per_kernel[event.name[:120]] += us / 1e6
    total = sum(per_kind.values())
    name = f"{'compile' if not args.no_compile else 'eager'}+{args.checkpointing}({args.save})" + \
        ("+fp8" if args.fp8 else "") + ("" if args.no_autocast else "+autocast")
    report = dict(config=name, step_s=round(step_s, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  kernel_s=round(total, 3), gpu_idle_s=round(step_s - total, 3),
                  kinds={k: round(v, 3) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
                  top_kernels={k: round(v, 4) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]},
                  wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps(report, indent=1), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", f"{torch.cuda.get_device_name()} {name}".lower()).strip("-")
    report.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cudnn=torch.backends.cudnn.version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    (out / f"profile-{slug}.json").write_text(json.dumps(report, indent=2))
    undo()
    remove_adapter(pipe)
    return report


if __name__ == "__main__":
    main()
