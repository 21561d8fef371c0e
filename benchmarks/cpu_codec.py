"""The default model's VAE on a CPU: the two speed-ups the main job relies on, each against its baseline in the
same run (interleaved, median of --repeat).

    .venv/bin/python benchmarks/cpu_codec.py [--repeat 3] [--out benchmarks/results]

1. codec round trips (`flywheel.model.encode.codec_roundtrips`, 16 clips of 17x64x64 from the PushT sample):
   the VAE's 3-D convolutions in the default layout (baseline) vs channels-last, as `load_pipeline` leaves them
   on a CPU (`flywheel.model.presets._channels_last_convolutions`);
2. codec round trips of 32 clips in VAE calls of 16 (CODEC_MAX_BATCH, the baseline) vs 8
   (`flywheel.model.encode.CPU_ROUNDTRIP_MAX_BATCH`, the CPU default);
3. decoding 8 videos' latents (random, of the shape a generated video's final latents have): one VAE call per video (baseline, `decode_batch: 1`) vs
   one call for all (`flywheel.generate.sampler.decode_latents`, the default on a CPU).
Each reports both times, the speed-up and the largest frame difference between the two (gray levels).
Writes <out>/cpu-codec.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out


def _set_layout(vae: torch.nn.Module, memory_format: torch.memory_format) -> None:
    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.to(memory_format=memory_format)


def _sample_clips(count: int) -> list[np.ndarray]:
    from flywheel.label.episodes import load_episodes

    episodes = load_episodes(REPO / "datasets" / "pusht_rotated", list(range(10)), image_size=64)
    clips = [ep.frames[start:start + 17] for ep in episodes for start in range(0, len(ep) - 17, 17)]
    return clips[:count]


def codec_workload(pipe, repeat: int) -> dict:
    from flywheel.model.encode import codec_roundtrips

    clips = _sample_clips(16)
    codec_roundtrips(pipe, clips[:2])  # oneDNN's first-call set-up, for both layouts
    base_s, ours_s = [], []
    for _ in range(repeat):
        _set_layout(pipe.vae, torch.contiguous_format)
        seconds, base = _timed(lambda: codec_roundtrips(pipe, clips))
        base_s.append(seconds)
        _set_layout(pipe.vae, torch.channels_last_3d)
        seconds, ours = _timed(lambda: codec_roundtrips(pipe, clips))
        ours_s.append(seconds)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(base, ours))
    return _result(f"{len(clips)} clips of 17x64x64, default layout vs channels-last", base_s, ours_s, diff)


def roundtrip_batch_workload(pipe, repeat: int) -> dict:
    from flywheel.model.encode import CODEC_MAX_BATCH, CPU_ROUNDTRIP_MAX_BATCH, codec_roundtrips

    clips = _sample_clips(32)
    base_s, ours_s = [], []
    for _ in range(repeat):
        seconds, base = _timed(lambda: codec_roundtrips(pipe, clips, batch_size=CODEC_MAX_BATCH))
        base_s.append(seconds)
        seconds, ours = _timed(lambda: codec_roundtrips(pipe, clips))
        ours_s.append(seconds)
    diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(base, ours))
    return _result(f"{len(clips)} clips of 17x64x64, {CODEC_MAX_BATCH} per VAE call vs the CPU default "
                   f"{CPU_ROUNDTRIP_MAX_BATCH}", base_s, ours_s, diff)


def decode_workload(pipe, repeat: int) -> dict:
    from flywheel.generate.sampler import _decode, decode_latents

    preset = pipe.flywheel_preset
    shape = (1, pipe.vae.config.z_dim, (preset.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
             preset.height // pipe.vae_scale_factor_spatial, preset.width // pipe.vae_scale_factor_spatial)
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    cpu = torch.device("cpu")
    to_uint8 = lambda f: (f.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()  # noqa: E731
    _decode(pipe, latents[0], preset.num_frames, "pt", cpu)
    base_s, ours_s = [], []
    for _ in range(repeat):
        seconds, base = _timed(lambda: [_decode(pipe, x, preset.num_frames, "pt", cpu).frames[0] for x in latents])
        base_s.append(seconds)
        seconds, ours = _timed(lambda: decode_latents(pipe, latents, preset.num_frames))
        ours_s.append(seconds)
    diff = max(int(np.abs(to_uint8(a).astype(int) - to_uint8(b).astype(int)).max()) for a, b in zip(base, ours))
    return _result(f"{len(latents)} videos of {preset.num_frames}x{preset.height}x{preset.width}, one call each vs "
                   "one call for all", base_s, ours_s, diff)


def _result(what: str, base_s: list[float], ours_s: list[float], max_diff: int) -> dict:
    base, ours = statistics.median(base_s), statistics.median(ours_s)
    return {"what": what, "baseline_s": round(base, 3), "ours_s": round(ours, 3), "speedup": round(base / ours, 2),
            "baseline_runs_s": [round(s, 3) for s in base_s], "ours_runs_s": [round(s, 3) for s in ours_s],
            "max_frame_difference_gray_levels": max_diff}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    import diffusers

    from flywheel.config import load_config
    from flywheel.stages import _pipeline

    pipe = _pipeline(load_config().model.model_copy(update={"device": "cpu"}), vae_only=True)
    report = {
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "cpus": torch.get_num_threads(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "model": pipe.flywheel_preset.name,
        "workloads": {"codec_roundtrips": codec_workload(pipe, args.repeat),
                      "roundtrip_batch": roundtrip_batch_workload(pipe, args.repeat),
                      "decode_videos": decode_workload(pipe, args.repeat)},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu-codec.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = [f"| {name} | {w['what']} | {w['baseline_s']} | {w['ours_s']} | {w['speedup']}x | "
            f"{w['max_frame_difference_gray_levels']} |" for name, w in report["workloads"].items()]
    (out / "cpu-codec.md").write_text("\n".join([
        f"# The default model's VAE on a CPU ({report['date']})", "",
        f"`python benchmarks/cpu_codec.py` on {report['machine']}, {report['cpus']} threads, torch {report['torch']}, "
        f"diffusers {report['diffusers']}, model {report['model']}; medians of {args.repeat} interleaved runs.", "",
        "| workload | what | baseline s | ours s | speed-up | largest frame difference (gray levels) |",
        "|---|---|---|---|---|---|", *rows, ""]))
    for name, w in report["workloads"].items():
        print(f"{name}: {w['baseline_s']} s -> {w['ours_s']} s ({w['speedup']}x), frames within "
              f"{w['max_frame_difference_gray_levels']} gray levels")
    return report


if __name__ == "__main__":
    main()
