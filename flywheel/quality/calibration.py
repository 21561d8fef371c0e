"""Thresholds from real data: every statistic is measured on held-out real clips, and each threshold is
a real percentile widened by a slack (see FilterConfig). Saved as JSON together with FILTER_VERSION.

Real clips are cut to look like generated ones: the episode resampled to the generated fps, windows of
the generated length, and as "conditioning frame" the real frame one step *before* the window. So the
first-frame statistics of real data measure "as close as the next real frame", which a generated video
(whose frame 0 reconstructs the conditioning frame) should beat, while a wrong first frame does not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from flywheel.label.episodes import Episode
from flywheel.label.labeling import nearest_indices, resample_actions
from flywheel.quality.config import FILTER_VERSION, FilterConfig
from flywheel.quality.stats import STAT_DIRECTION, action_reference
from flywheel.store import atomic_write_bytes, hash_json


@dataclass
class Clip:
    """One clip to score: frames uint8 [T,H,W,3] (or an mp4 path), its conditioning frame, optional actions."""

    clip_id: str
    frames: np.ndarray | str | Path
    first_frame: np.ndarray
    fps: float
    actions: np.ndarray | None = None
    group: str | None = None          # near-duplicates are looked for inside a group (e.g. the prompt)
    disagreement: np.ndarray | None = None
    extra_stats: dict[str, float] = field(default_factory=dict)  # e.g. a verifier's replay errors
    kind: str = "unknown"             # validation: "good" or the corruption applied


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    filter_version: str
    config_hash: str
    values: dict[str, float]                  # stat -> threshold
    directions: dict[str, str]                # stat -> "min" | "max"
    real_quantiles: dict[str, dict[str, float]]  # stat -> {p_lo, p50, p_hi} on real clips
    action_reference: dict | None = None
    num_real_clips: int = 0
    source: dict = {}

    def save(self, path: str | Path) -> Path:
        return atomic_write_bytes(path, self.model_dump_json(indent=2).encode())

    @classmethod
    def load(cls, path: str | Path) -> Thresholds:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: thresholds file not found; run calibrate() first")
        t = cls.model_validate(json.loads(path.read_text()))
        if t.filter_version != FILTER_VERSION:
            raise ValueError(f"{path}: thresholds are for filter version {t.filter_version}, code is {FILTER_VERSION}; "
                             "re-run calibrate() on real clips")
        return t

    def effective(self, config: FilterConfig) -> dict[str, float]:
        """Calibrated thresholds with config overrides applied."""
        unknown = sorted(set(config.overrides) - set(STAT_DIRECTION) - set(self.values))
        if unknown:
            raise ValueError(f"FilterConfig.overrides: unknown stats {unknown}; known: {sorted(STAT_DIRECTION)}")
        return {**self.values, **config.overrides}


def real_clips(episodes: list[Episode], num_frames: int, fps: float, stride_s: float = 1.0,
               max_clips_per_episode: int | None = None) -> list[Clip]:
    """Windows of real episodes shaped like generated clips (see module doc)."""
    clips = []
    for ep in episodes:
        idx = nearest_indices(len(ep), ep.fps, fps)
        acts = resample_actions(ep.actions, ep.fps, fps, len(idx))
        step = max(1, int(round(stride_s * fps)))
        starts = list(range(1, len(idx) - num_frames + 1, step))[:max_clips_per_episode]
        for s in starts:
            clips.append(Clip(clip_id=f"real-ep{ep.index}-t{s}", frames=ep.frames[idx[s:s + num_frames]],
                              first_frame=ep.frames[idx[s - 1]], fps=fps, actions=acts[s:s + num_frames],
                              group=f"real-ep{ep.index}-t{s}", kind="good"))
    if not clips:
        raise ValueError(f"no real clip of {num_frames} frames at {fps} fps fits in episodes "
                         f"{[e.index for e in episodes]}; use longer episodes or shorter clips")
    return clips


def calibrate(clips: list[Clip], config: FilterConfig, action_episodes: list[Episode] | None = None,
              idm=None, source: dict | None = None) -> Thresholds:
    """Thresholds from real clips. With `idm`, clip actions are the IDM's labels (as for generated clips)
    and the disagreement threshold is calibrated too; `action_episodes` (real, full) set the action scales."""
    from flywheel.quality.filters import score_clips

    reference = None
    if action_episodes:
        reference = action_reference([e.actions for e in action_episodes], action_episodes[0].fps)
    if idm is not None:
        from flywheel.label.labeling import label_video

        labelled = []
        for c in clips:
            actions, disagreement = label_video(idm, c.frames, c.fps)
            labelled.append(Clip(**{**c.__dict__, "actions": actions, "disagreement": disagreement}))
        clips = labelled
    scores = score_clips(clips, config, reference)
    values, quantiles = {}, {}
    for stat, direction in STAT_DIRECTION.items():
        if stat not in scores or scores[stat].isna().all():
            continue
        values[stat], quantiles[stat] = _threshold(scores[stat].dropna().to_numpy(), direction, config)
        if direction == "max" and stat in config.floors:
            values[stat] = max(values[stat], config.floors[stat])
    for stat in sorted({k for c in clips for k in c.extra_stats}):
        # Verifier stats (replay errors) are "at most" by convention.
        vals = np.array([c.extra_stats[stat] for c in clips if stat in c.extra_stats])
        values[stat], quantiles[stat] = _threshold(vals, "max", config)
    return Thresholds(filter_version=FILTER_VERSION, config_hash=hash_json(config.model_dump())[:16], values=values,
                      directions={s: STAT_DIRECTION.get(s, "max") for s in values}, real_quantiles=quantiles,
                      action_reference=reference, num_real_clips=len(clips), source=source or {})


def _threshold(x: np.ndarray, direction: str, config: FilterConfig) -> tuple[float, dict]:
    lo, med, hi = np.percentile(x, [config.percentile_lo, 50, config.percentile_hi])
    q = {"p_lo": float(lo), "p50": float(med), "p_hi": float(hi)}
    if direction == "max":
        return float(hi + config.slack * (hi - med)), q
    # "At least" stats are all positive; never ask less than a fraction of the real low percentile.
    return float(max(lo - config.slack * (med - lo), config.min_fraction_of_low * lo)), q
