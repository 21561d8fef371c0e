"""Adapter evaluation: does the adapter move generations toward the domain's real held-out clips?

For each held-out clip and seed, generate from the clip's first frame and prompt with the base model
and with the adapter (same initial noise), and compare both with the real frames that followed:
PSNR and SSIM over the predicted frames (the conditioning frame excluded).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flywheel.quality.stats import gray, psnr, ssim


def video_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-frame SSIM of two uint8 stacks [T,H,W,3], on luma."""
    return float(np.mean([ssim(x, y) for x, y in zip(gray(a), gray(b))]))


def evaluation_clips(clip_frame, split: str, max_clips: int):
    """Held-out clips of `split`; falls back to train clips (flagged) when a tiny dataset has none."""
    rows = clip_frame[clip_frame["split"] == split]
    used = split
    if rows.empty:
        rows, used = clip_frame[clip_frame["split"] == "train"], "train"
    return rows.head(max_clips), used


def evaluate_adapter(pipe, adapter_dir: Path, clip_set, config, out_dir: Path, generate_config, progress=None) -> dict:
    """Generate base vs adapter on held-out clips, score against real frames, write metrics + a contact sheet."""
    from flywheel.data.video import read_frames
    from flywheel.generate.preview import contact_sheet
    from flywheel.generate.world import GenerationRequest, generate_videos, unload_adapters

    clips, split_used = evaluation_clips(clip_set.frame, config.split, config.max_clips)
    if clips.empty:
        raise ValueError(f"{clip_set.path}: no clips to evaluate on (split {config.split!r} and train are empty)")
    requests = []
    for _, clip in clips.iterrows():
        for seed in config.seeds:
            for adapter in (None, "candidate"):
                requests.append(GenerationRequest(
                    request_id=f"{clip['clip_id']}-s{seed}-{adapter or 'base'}",
                    first_frame=clip_set.path / clip["first_frame"], prompt=clip["prompt"], seed=seed,
                    adapter=adapter, source_episode_id=clip["episode_id"], source_clip_id=clip["clip_id"]))
    gen_dir = out_dir / "generations"
    try:
        result = generate_videos(pipe, requests, gen_dir, generate_config,
                                 adapters={"candidate": Path(adapter_dir)}, progress=progress)
    finally:
        unload_adapters(pipe)
    rows, sheet_videos, sheet_labels = [], [], []
    samples = result.frame.set_index("request_id")
    for _, clip in clips.iterrows():
        real = read_frames(clip_set.path / clip["video"])
        for seed in config.seeds:
            scores = {"clip_id": clip["clip_id"], "seed": seed}
            for name in ("base", "candidate"):
                video = read_frames(gen_dir / samples.loc[f"{clip['clip_id']}-s{seed}-{name}", "video"])
                n = min(len(video), len(real))
                scores[f"psnr_{name}"] = psnr(video[1:n], real[1:n])
                scores[f"ssim_{name}"] = video_ssim(video[1:n], real[1:n])
                if seed == config.seeds[0]:
                    sheet_videos.append(video)
                    sheet_labels.append(f"{clip['clip_id']} {name}")
            if seed == config.seeds[0]:
                sheet_videos.append(real)
                sheet_labels.append(f"{clip['clip_id']} real")
            rows.append(scores)
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    metrics = {
        "split": split_used,
        "clips": int(len(clips)),
        "seeds": list(config.seeds),
        "psnr_base": mean("psnr_base"),
        "psnr_adapter": mean("psnr_candidate"),
        "ssim_base": mean("ssim_base"),
        "ssim_adapter": mean("ssim_candidate"),
    }
    metrics["psnr_gain_db"] = metrics["psnr_adapter"] - metrics["psnr_base"]
    metrics["ssim_gain"] = metrics["ssim_adapter"] - metrics["ssim_base"]
    metrics["min_psnr_gain_db"] = config.min_psnr_gain_db
    metrics["passed"] = bool(metrics["psnr_gain_db"] >= config.min_psnr_gain_db)
    (out_dir / "metrics.json").write_text(json.dumps({"summary": metrics, "per_clip": rows}, indent=2))
    contact_sheet(sheet_videos, sheet_labels, out_dir / "comparison.png")
    return metrics
