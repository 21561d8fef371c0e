"""The filter stack, cheapest first. Each filter checks some statistics against thresholds; a clip is
accepted when every enabled filter passes. Every statistic is kept per clip, and a failed clip carries
its reasons ("static: motion=0.04 < 0.61"), so rejected clips can be browsed and the thresholds argued with.

Order (cost): decode/shape -> first-frame fidelity -> static (freezes, idle) -> flicker/drift -> colour ->
blur/exposure/noise -> temporal order -> persistence (what no motion explains) -> near-duplicates
(perceptual hash, within a group) -> action sanity -> verifier (simulator replay and progress).
All statistics are computed for every decodable clip (they are cheap), so scores exist for every filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.data.video import VideoError, read_frames
from flywheel.quality.calibration import Clip, Thresholds
from flywheel.quality.config import FILTER_VERSION, FilterConfig
from flywheel.quality.stats import action_stats, clip_hash, video_stats
from flywheel.quality.verifier import PROGRESS_STAT  # judged only against FilterConfig.min_progress

# filter name -> the statistics it judges, in stack order.
FILTERS: dict[str, list[str]] = {
    "decode": [],
    "first_frame": ["psnr_first", "ssim_first"],
    "static": ["frozen_tail", "idle"],
    "flicker": ["flicker", "border_drift"],
    "colour": ["colour_shift"],
    "blur_exposure": ["sharpness_ratio", "exposure_shift", "clipped_increase", "noise_ratio"],
    "temporal": ["order_ratio", "reversal", "lag_ratio"],
    "persistence": ["unexplained_change"],
    "duplicate": ["duplicate_distance"],
    "action": ["action_range", "action_velocity", "action_jerk", "idm_disagreement"],
    "verifier": [],  # filled by the stats a Verifier returns (any stat not claimed above)
}


def _decode(clip: Clip, config: FilterConfig) -> tuple[np.ndarray | None, str | None]:
    frames = clip.frames
    if isinstance(frames, (str, Path)):
        try:
            frames = read_frames(frames)
        except VideoError as e:
            return None, f"decode: {e}"
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        return None, f"decode: expected uint8 [T,H,W,3] frames, got {frames.dtype} {frames.shape}"
    if len(frames) < config.min_frames:
        return None, f"decode: {len(frames)} frames < min_frames {config.min_frames}"
    if config.expected_hw is not None and tuple(frames.shape[1:3]) != tuple(config.expected_hw):
        return None, f"decode: frame size {frames.shape[1:3]} != expected {tuple(config.expected_hw)}"
    return frames, None


def score_clips(clips: Sequence[Clip], config: FilterConfig, action_reference: dict | None = None) -> pd.DataFrame:
    """Statistics only (no thresholds): one row per clip, NaN where a statistic does not apply."""
    rows, hashes = [], []
    for clip in clips:
        frames, error = _decode(clip, config)
        row = {"clip_id": clip.clip_id, "group": clip.group, "kind": clip.kind, "decode_error": error,
               "num_frames": np.nan if frames is None else len(frames)}
        if frames is not None:
            row.update(video_stats(frames, clip.first_frame, config.analysis_size, config.static_eps,
                                   reference=clip.reference, still_factor=config.still_factor))
            if clip.actions is not None and action_reference is not None:
                row.update(action_stats(clip.actions, clip.fps, action_reference))
            if clip.disagreement is not None:
                row["idm_disagreement"] = float(np.mean(clip.disagreement))
        row.update(clip.extra_stats)
        hashes.append(None if frames is None else clip_hash(frames))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["duplicate_distance"] = _duplicate_distances(df["group"].tolist(), hashes)
    return df


def _duplicate_distances(groups: list, hashes: list) -> list[float]:
    """For each clip, the Hamming distance to the nearest *earlier* clip of its group (NaN if first):
    the first of a set of duplicates is kept, the later ones are flagged."""
    out = []
    for i, (g, h) in enumerate(zip(groups, hashes)):
        earlier = [hashes[j] for j in range(i) if g is not None and groups[j] == g and hashes[j] is not None]
        out.append(float(min(np.count_nonzero(h != e) for e in earlier)) if h is not None and earlier else np.nan)
    return out


def filter_clips(clips: Sequence[Clip], thresholds: Thresholds, config: FilterConfig) -> pd.DataFrame:
    """Score clips and judge them: every stat, `pass_<filter>` per filter, `accepted`, `reasons`."""
    if thresholds.filter_version != FILTER_VERSION:
        raise ValueError(f"thresholds are for filter version {thresholds.filter_version}, code is {FILTER_VERSION}; "
                         "re-calibrate")
    return judge(score_clips(clips, config, thresholds.action_reference), thresholds, config)


def judge(df: pd.DataFrame, thresholds: Thresholds, config: FilterConfig) -> pd.DataFrame:
    """`filter_clips` on clips already scored (`score_clips`): adds pass_<filter>, accepted, reasons."""
    if thresholds.filter_version != FILTER_VERSION:
        raise ValueError(f"thresholds are for filter version {thresholds.filter_version}, code is {FILTER_VERSION}; "
                         "re-calibrate")
    df = df.copy()
    limits = thresholds.effective(config)
    limits.setdefault("duplicate_distance", float(config.duplicate_max_hamming) + 0.5)
    directions = {PROGRESS_STAT: "min", **thresholds.directions, "duplicate_distance": "min"}
    if config.min_progress is not None and PROGRESS_STAT not in config.overrides:
        limits[PROGRESS_STAT] = config.min_progress
    claimed = {s for stats in FILTERS.values() for s in stats}
    verifier_stats = [s for s in limits if s not in claimed and s in df.columns]
    reasons: list[list[str]] = [[] if e is None else [e] for e in df["decode_error"]]
    for name, stats in FILTERS.items():
        stats = verifier_stats if name == "verifier" else stats
        if name in config.disabled:
            continue
        passed = df["decode_error"].isna().to_numpy() if name == "decode" else np.ones(len(df), bool)
        for stat in stats:
            if stat not in df.columns or stat not in limits:
                continue
            limit, direction = limits[stat], directions.get(stat, "max")
            values = df[stat].to_numpy(dtype=float)
            bad = (values > limit) if direction == "max" else (values < limit)
            bad &= ~np.isnan(values)  # a stat that does not apply cannot fail
            for i in np.flatnonzero(bad):
                sign = ">" if direction == "max" else "<"
                reasons[i].append(f"{name}: {stat}={values[i]:.4g} {sign} {limit:.4g}")
            passed &= ~bad
        df[f"pass_{name}"] = passed
    pass_cols = [c for c in df.columns if c.startswith("pass_")]
    df["accepted"] = df[pass_cols].all(axis=1)
    df["reasons"] = ["; ".join(r) for r in reasons]
    df["filter_version"] = FILTER_VERSION
    df.attrs["thresholds"] = limits
    return df


def run_filters(videos: Sequence[np.ndarray | str | Path], first_frames: Sequence[np.ndarray],
                actions: Sequence[np.ndarray | None] | None, thresholds: Thresholds, config: FilterConfig, *,
                fps: float | Sequence[float], clip_ids: Sequence[str] | None = None,
                groups: Sequence[str | None] | None = None, disagreements: Sequence[np.ndarray | None] | None = None,
                extra_stats: Sequence[dict] | None = None,
                references: Sequence[np.ndarray | None] | None = None) -> pd.DataFrame:
    """One row per clip (see `filter_clips`). videos: frames or mp4 paths; groups: e.g. the prompt
    (near-duplicates are looked for within a group); extra_stats: e.g. a Verifier's scores per clip;
    references: each clip's conditioning frame as the codec renders a still clip of it (see `Clip`)."""
    n = len(videos)
    if len(first_frames) != n or (actions is not None and len(actions) != n):
        raise ValueError(f"run_filters: {n} videos but {len(first_frames)} first frames"
                         f"{'' if actions is None else f' and {len(actions)} action arrays'}; pass one per clip")
    fps_list = list(fps) if isinstance(fps, Sequence) else [float(fps)] * n
    clips = [Clip(clip_id=clip_ids[i] if clip_ids else str(i), frames=videos[i], first_frame=first_frames[i],
                  fps=fps_list[i], actions=None if actions is None else actions[i],
                  group=groups[i] if groups else None,
                  disagreement=None if disagreements is None else disagreements[i],
                  extra_stats=dict(extra_stats[i]) if extra_stats else {},
                  reference=None if references is None else references[i]) for i in range(n)]
    return filter_clips(clips, thresholds, config)
