"""Adapter evaluation: does the adapter move generations toward the domain's real held-out clips?

For each held-out clip and seed, generate from the clip's first frame and prompt with the base model
and with the adapter (same initial noise), and compare both with the real frames that followed:
PSNR and SSIM over the predicted frames (the conditioning frame excluded). With a filter config, also
the share of each side's videos the quality stack's video filters keep (thresholds calibrated on the
clip set's real clips; the action filters need the domain's IDM and run later, in the curate stage).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flywheel.image_metrics import gray, psnr, ssim


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


def video_filter_results(pipe, clip_set, videos: dict[str, np.ndarray], first_frames: dict[str, np.ndarray],
                         fps: float, filter_config):
    """(thresholds, per-video filter results) for generated `videos` by request id: the quality stack's
    video filters, calibrated on every real clip of the clip set (through the model's VAE first when
    filter_config.calibrate_on is "model_codec")."""
    from PIL import Image

    from flywheel.data.video import read_frames
    from flywheel.model.encode import codec_roundtrips
    from flywheel.quality.calibration import Clip, calibrate
    from flywheel.quality.filters import run_filters

    rows = [clip for _, clip in clip_set.frame.iterrows()]
    videos_real = [read_frames(clip_set.path / clip["video"]) for clip in rows]
    if filter_config.calibrate_on == "model_codec":
        videos_real = codec_roundtrips(pipe, videos_real)
    real = [Clip(clip_id=clip["clip_id"], frames=frames,
                 first_frame=np.asarray(Image.open(clip_set.path / clip["first_frame"]).convert("RGB")),
                 fps=float(clip["fps"]), group=clip["clip_id"], kind="good")
            for clip, frames in zip(rows, videos_real)]
    thresholds = calibrate(real, filter_config, source={"clip_set": str(clip_set.path),
                                                        "calibrate_on": filter_config.calibrate_on})
    ids = list(videos)
    results = run_filters([videos[i] for i in ids], [first_frames[i] for i in ids], None, thresholds, filter_config,
                          fps=fps, clip_ids=ids)
    return thresholds, results.set_index("clip_id")


def evaluate_adapter(pipe, adapter_dir: Path, clip_set, config, out_dir: Path, generate_config, progress=None,
                     filter_config=None) -> dict:
    """Generate base vs adapter on held-out clips, score against real frames, write metrics + a contact sheet."""
    from flywheel.data.video import read_frames
    from flywheel.preview import contact_sheet
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
    generated = {rid: read_frames(gen_dir / samples.loc[rid, "video"]) for rid in samples.index}
    for _, clip in clips.iterrows():
        real = read_frames(clip_set.path / clip["video"])
        for seed in config.seeds:
            scores = {"clip_id": clip["clip_id"], "seed": seed}
            for name in ("base", "candidate"):
                video = generated[f"{clip['clip_id']}-s{seed}-{name}"]
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
    if filter_config is not None:
        from PIL import Image

        first_frames = {r.request_id: np.asarray(Image.open(r.first_frame).convert("RGB")) for r in requests}
        thresholds, kept = video_filter_results(pipe, clip_set, generated, first_frames,
                                                float(clips["fps"].iloc[0]), filter_config)
        for row in rows:
            for name in ("base", "candidate"):
                rid = f"{row['clip_id']}-s{row['seed']}-{name}"
                row[f"kept_{name}"] = bool(kept.loc[rid, "accepted"])
                row[f"rejected_by_{name}"] = kept.loc[rid, "reasons"]
        metrics["video_filter_pass_rate_base"] = float(np.mean([r["kept_base"] for r in rows]))
        metrics["video_filter_pass_rate_adapter"] = float(np.mean([r["kept_candidate"] for r in rows]))
        metrics["video_filters_calibrated_on"] = f"{thresholds.num_real_clips} real clips ({filter_config.calibrate_on})"
    (out_dir / "metrics.json").write_text(json.dumps({"summary": metrics, "per_clip": rows}, indent=2))
    contact_sheet(sheet_videos, sheet_labels, out_dir / "comparison.png")
    return metrics
