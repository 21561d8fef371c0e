"""Step caching on a trained model: how many steps First Block Cache skips, and what it costs in PSNR.

The H200 numbers for `generate.step_cache_threshold` (cosmos_predict25.py) come from random weights,
whose block-0 residual may change between steps quite unlike a trained model's. This runs the same
sampler and hook on the one trained model that needs no download, the pretrained `tiny-pusht` (same
Cosmos classes, a 6-block DiT: a skipped step runs 1 block of 6), from real first frames of the default-view PushT sample: per threshold,
the steps skipped and the PSNR against the uncached video from the same noise, at the preset's 12
steps and at the 2B's 36. Runs on a CPU in a few minutes; writes <out>/step-cache-tiny-pusht.json.

    python benchmarks/step_cache_trained.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flywheel.image_metrics import psnr  # noqa: E402


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two float videos in [0, 1]; 100 dB stands for identical."""
    return psnr(a, b, peak=1.0, cap=100.0)


def first_frames(root: Path, episodes: int) -> list[tuple[np.ndarray, str]]:
    """(first frame HxWx3 uint8, task) of the first `episodes` episodes, through LeRobot's dataset API."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("flywheel/pusht-sample", root=root, video_backend="pyav")
    starts = ds.meta.episodes["dataset_from_index"][:episodes]
    out = []
    for start in starts:
        item = ds[int(start)]
        frame = (item["observation.image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        out.append((frame, item["task"]))
    return out


def main(argv=None) -> dict:
    from PIL import Image

    from flywheel.generate.sampler import sample_image_to_world
    from flywheel.model.presets import load_pipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--episodes", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", default="12,36")
    p.add_argument("--thresholds", default="0.02,0.05,0.1,0.2")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pipe = load_pipeline("tiny-pusht", device=torch.device("cpu"))
    preset = pipe.flywheel_preset
    frames = first_frames(REPO / "datasets" / "pusht", args.episodes)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    settings = dict(height=preset.height, width=preset.width, num_frames=preset.num_frames,
                    guidance_scale=preset.guidance_scale, output_type="np")
    latent_shape = (1, pipe.transformer.config.in_channels - 1,
                    (preset.num_frames - 1) // pipe.vae_scale_factor_temporal + 1,
                    preset.height // pipe.vae_scale_factor_spatial, preset.width // pipe.vae_scale_factor_spatial)
    results: dict[str, dict] = {}
    for steps in (int(s) for s in args.steps.split(",")):
        runs: dict[str, list] = {"none": []}
        for episode, (frame, task) in enumerate(frames):
            with torch.no_grad():
                embeds, _ = pipe.encode_prompt(task, do_classifier_free_guidance=False,
                                               max_sequence_length=preset.max_sequence_length)
            for seed in range(args.seeds):
                latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))

                def generate(threshold):
                    start = time.perf_counter()
                    video = sample_image_to_world(pipe, Image.fromarray(frame), embeds, latents=latents,
                                                  num_inference_steps=steps, step_cache_threshold=threshold,
                                                  **settings).frames[0]
                    return video, time.perf_counter() - start, pipe.flywheel_last_step_cache

                reference, seconds, _ = generate(None)
                runs["none"].append(dict(seconds=seconds))
                for threshold in thresholds:
                    video, seconds, cache = generate(threshold)
                    runs.setdefault(f"{threshold:g}", []).append(dict(
                        seconds=seconds, psnr_db=psnr_db(reference, video), skipped=cache["skipped_steps"],
                        pattern="".join("C" if c else "." for c in cache["computed"])))
                print(f"{steps} steps, episode {episode}, seed {seed}: " + ", ".join(
                    f"t={k}: skipped {v[-1]['skipped']}, {v[-1]['psnr_db']:.1f} dB" for k, v in runs.items()
                    if k != "none"), flush=True)
        none_s = statistics.median(r["seconds"] for r in runs["none"])
        results[f"{steps}_steps"] = {"uncached_s": round(none_s, 3), **{
            k: dict(skipped_mean=round(statistics.mean(r["skipped"] for r in v), 2),
                    psnr_db_mean=round(statistics.mean(r["psnr_db"] for r in v), 2),
                    psnr_db_min=round(min(r["psnr_db"] for r in v), 2),
                    seconds_ratio=round(statistics.median(r["seconds"] for r in v) / none_s, 3),
                    patterns=sorted({r["pattern"] for r in v}))
            for k, v in runs.items() if k != "none"}}
    import diffusers

    report = dict(schema="flywheel-step-cache-trained/1", model="tiny-pusht", revision=preset.revision,
                  device="cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  software=dict(torch=torch.__version__, diffusers=diffusers.__version__),
                  videos_per_setting=len(frames) * args.seeds, frames=preset.num_frames,
                  size=f"{preset.height}x{preset.width}", guidance_scale=preset.guidance_scale, results=results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step-cache-tiny-pusht.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(results, indent=1))
    return report


if __name__ == "__main__":
    main()
