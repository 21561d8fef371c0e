"""Thresholds from real data: every statistic is measured on held-out real clips, and each threshold is
a real percentile widened by a slack (see FilterConfig). Saved as JSON together with FILTER_VERSION.

Real clips are cut to look like generated ones: the episode resampled to the generated fps, windows of
the generated length, and as "conditioning frame" the real frame one step *before* the window. So the
first-frame statistics of real data measure "as close as the next real frame", which a generated video
(whose frame 0 reconstructs the conditioning frame) should beat, while a wrong first frame does not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from flywheel.label.episodes import Episode
from flywheel.label.labeling import nearest_indices, resample_actions
from flywheel.quality.config import FILTER_VERSION, FilterConfig
from flywheel.quality.stats import STAT_BOUNDS, STAT_DIRECTION, action_reference
from flywheel.quality.verifier import AT_LEAST, PROGRESS_STAT
from flywheel.store import atomic_write_bytes, hash_json


@dataclass
class Clip:
    """One clip to score: frames uint8 [T,H,W,3] (or an mp4 path), its conditioning frame, optional actions."""

    clip_id: str
    frames: np.ndarray | str | Path
    first_frame: np.ndarray
    fps: float
    # The conditioning frame as the model's codec renders a still clip of it ([T,H,W,3]); None: the raw
    # conditioning frame. Statistics are measured against it (see stats.video_stats).
    reference: np.ndarray | None = None
    actions: np.ndarray | None = None
    group: str | None = None          # near-duplicates are looked for inside a group (e.g. the prompt)
    disagreement: np.ndarray | None = None
    extra_stats: dict[str, float] = field(default_factory=dict)  # e.g. a verifier's replay errors
    kind: str = "unknown"             # validation: "good" or the corruption applied
    meta: dict = field(default_factory=dict)  # provenance, e.g. the episode and frame the clip starts from


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    filter_version: str
    config_hash: str
    values: dict[str, float]                  # stat -> threshold
    directions: dict[str, str]                # stat -> "min" | "max"
    real_quantiles: dict[str, dict[str, float]]  # stat -> {p_lo, p50, p_hi} on real clips
    slack: dict[str, float] = {}              # stat -> the slack its threshold was widened by (see calibrate)
    action_reference: dict | None = None
    num_real_clips: int = 0
    calibrated_on: str = "real"               # what the real clips looked like: "real" | "model_codec"
    codec_psnr: float | None = None           # codec round-trip fidelity on the real clips, dB (model_codec only)
    notes: list[str] = []                     # what calibration found and did: checks unable to fire, repairs
    # The share of the real clips the whole stack rejects when calibrated without the clip's episode: the
    # calibration's own estimate of its false rejection on episodes it has not seen (None: one episode only).
    held_out_false_rejection: float | None = None
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
                              group=f"real-ep{ep.index}-t{s}", kind="good",
                              meta={"episode_index": ep.index, "frame_indices": idx[s - 1:s + num_frames].tolist()}))
    if not clips:
        raise ValueError(f"no real clip of {num_frames} frames at {fps} fps fits in episodes "
                         f"{[e.index for e in episodes]}; use longer episodes or shorter clips")
    return clips


def spread(items: list, n: int) -> list:
    """At most n of `items`, evenly spaced (first and last included), in order."""
    if n <= 0:
        return []
    if len(items) <= n:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def video_calibration_clips(episodes: list[Episode], num_frames: int, fps: float, max_clips: int) -> list[Clip]:
    """Up to `max_clips` real clips of the domain's training episodes, evenly spread, without actions: they
    calibrate the video statistics only (an IDM trained on these episodes labels them better than it labels
    anything new, so its statistics are calibrated on held-out episodes alone)."""
    if max_clips <= 0 or not episodes:
        return []
    try:
        clips = real_clips(episodes, num_frames, fps)
    except ValueError:  # every training episode shorter than a clip: the held-out clips calibrate alone
        return []
    return [dataclasses.replace(c, actions=None) for c in spread(clips, max_clips)]


def calibrate(clips: list[Clip], config: FilterConfig, action_episodes: list[Episode] | None = None,
              idm=None, source: dict | None = None, extra_directions: dict[str, str] | None = None,
              calibrated_on: str = "real", codec_psnr: float | None = None, notes: list[str] | None = None) -> Thresholds:
    """Thresholds from real clips. With `idm`, clip actions are the IDM's labels (as for generated clips;
    clips without actions, the training episodes' video-only ones, stay unlabelled) and the disagreement
    threshold is calibrated too; `action_episodes` (the real episodes the domain trains on, full length) set
    the action scales. `extra_directions`: "min"/"max" of verifier stats (default
    "max"). `calibrated_on`/`codec_psnr`/`notes`: recorded (see flywheel.quality.curation.calibration_clips).

    Each threshold is a real percentile widened by a slack (FilterConfig): the smallest slack, from
    `slack` up to `max_slack`, at which at most `held_out_rejection` of the clips of each calibration
    episode fall beyond a threshold calibrated on the *other* episodes (leave one episode out): thresholds
    that hold on episodes they did not see, not just on the ones they came from; then the stack as a whole
    is held to `stack_held_out_rejection` (_widen_for_the_stack; Thresholds.held_out_false_rejection says what
    it reached)."""
    from flywheel.quality.filters import score_clips

    reference = None
    if action_episodes:
        reference = action_reference([e.actions for e in action_episodes], action_episodes[0].fps)
        reference["episodes"] = [int(e.index) for e in action_episodes]
        num_frames = next((len(c.actions) for c in clips if c.actions is not None), None)
        if num_frames is None and not isinstance(clips[0].frames, (str, Path)):
            num_frames = len(clips[0].frames)
        if num_frames:
            reference["real_clip_quantile"] = real_action_clip_quantiles(
                [e.actions for e in action_episodes], action_episodes[0].fps, num_frames, clips[0].fps, reference,
                config.percentile_hi)
    if idm is not None:
        from flywheel.label.labeling import label_video

        labelled = []
        for c in clips:
            if c.actions is None:  # a training episode's clip (video_calibration_clips): video statistics only
                labelled.append(c)
                continue
            actions, disagreement = label_video(idm, c.frames, c.fps)
            labelled.append(dataclasses.replace(c, actions=actions, disagreement=disagreement))
        clips = labelled
    scores = score_clips(clips, config, reference)
    episodes = [str(c.meta.get("episode_index", c.group)) for c in clips]
    directions = {**STAT_DIRECTION, **{k: "min" if k in AT_LEAST else "max" for c in clips for k in c.extra_stats},
                  **(extra_directions or {})}
    return thresholds_from_scores(scores, episodes, config, directions, action_reference=reference, source=source,
                                  calibrated_on=calibrated_on, codec_psnr=codec_psnr, notes=notes)


def real_action_clip_quantiles(episodes: list[np.ndarray], fps: float, num_frames: int, clip_fps: float,
                               reference: dict, percentile: float) -> dict[str, float]:
    """The action statistics of the domain's real actions cut into clips like the generated ones (resampled to
    `clip_fps`, every window of `num_frames`): their `percentile` per statistic. A pseudo-action as smooth and
    as fast as the real demonstrations is plausible, whatever the IDM's labels of real clips look like."""
    from flywheel.quality.stats import action_stats

    rows = []
    for actions in episodes:
        resampled = resample_actions(actions, fps, clip_fps)
        for s in range(0, len(resampled) - num_frames + 1):
            rows.append(action_stats(resampled[s:s + num_frames], clip_fps, reference))
    if not rows:
        return {}
    table = pd.DataFrame(rows)
    return {stat: float(np.percentile(table[stat], percentile)) for stat in ("action_velocity", "action_jerk")}


def thresholds_from_scores(scores: pd.DataFrame, episodes: list[str], config: FilterConfig, directions: dict[str, str],
                           action_reference: dict | None = None, source: dict | None = None,
                           calibrated_on: str = "real", codec_psnr: float | None = None,
                           notes: list[str] | None = None) -> Thresholds:
    """`calibrate` once the real clips are scored: `scores` one row per clip, `episodes` the episode of each."""
    episodes = np.asarray(episodes)
    values, quantiles, slacks, notes = {}, {}, {}, list(notes or [])
    real_actions = (action_reference or {}).get("real_clip_quantile", {})
    checks = {}
    for stat, direction in directions.items():
        if stat in ("idle", PROGRESS_STAT) or stat not in scores or scores[stat].isna().all():
            continue
        x = scores[stat].to_numpy(dtype=float)
        limit = functools.partial(_limit, stat=stat, direction=direction, config=config, real_actions=real_actions)
        checks[stat] = functools.partial(_held_out_beyond, x, episodes, limit, direction)
        slacks[stat] = _held_out_slack(checks[stat], int((~np.isnan(x)).sum()), config)
    held_out, widened = _widen_for_the_stack(checks, episodes, slacks, config)
    notes += widened
    for stat, slack in slacks.items():
        x = scores[stat].to_numpy(dtype=float)
        x = x[~np.isnan(x)]
        direction = directions[stat]
        values[stat], quantiles[stat] = _limit(x, slack, stat, direction, config, real_actions)
        bound = STAT_BOUNDS.get(stat)
        if bound is not None and (values[stat] >= bound if direction == "max" else values[stat] <= bound):
            # Repaired to the most extreme value a real clip showed: every calibration clip still passes, and
            # the check can fire again (default job, 25 PushT clips: frozen_tail calibrated to 2.9 of at most 1).
            extreme = float(x.max() if direction == "max" else x.min())
            reachable = extreme < bound if direction == "max" else extreme > bound
            notes.append(f"{stat}: calibrated threshold {values[stat]:.4g} is beyond what the statistic can reach "
                         f"({bound:g}); " + (f"repaired to the most extreme real value, {extreme:.4g}" if reachable
                                             else "a real clip reaches the bound, so this check cannot fire"))
            if reachable:
                values[stat] = extreme
    if "idle" in scores:
        idle = int(np.nansum(scores["idle"].to_numpy(dtype=float)))
        if idle == 0:
            values["idle"], quantiles["idle"], slacks["idle"] = 0.5, {"p_lo": 0.0, "p50": 0.0, "p_hi": 0.0}, 0.0
            notes.append("idle: no real clip is still throughout, so a generated clip that never moves is rejected")
        else:
            notes.append(f"idle: {idle} of {len(scores)} real clips are still throughout (a robot at rest), so a "
                         "generated clip that never moves is not rejected for it")
    return Thresholds(filter_version=FILTER_VERSION, config_hash=hash_json(config.model_dump())[:16], values=values,
                      directions={s: directions.get(s, "max") for s in values}, real_quantiles=quantiles,
                      slack=slacks, action_reference=action_reference, num_real_clips=len(scores),
                      calibrated_on=calibrated_on, codec_psnr=codec_psnr, notes=notes, source=source or {},
                      held_out_false_rejection=held_out)


def _limit(x: np.ndarray, slack: float, stat: str, direction: str, config: FilterConfig,
           real_actions: dict[str, float]) -> tuple[float, dict]:
    """A check's threshold from real values `x` (no NaN) at `slack`, and the real quantiles it started from."""
    value, q = _threshold(x, direction, config, slack)
    if direction == "max" and stat in config.floors:
        value = max(value, config.floors[stat])
    if direction == "max" and stat in real_actions:
        # Never stricter than the domain's own demonstrations: the IDM's labels of real clips are smoother
        # than the real actions, so a threshold from them alone rejected plausible labels (PushT: a held-out
        # clean clip at 0.90 x the real p99 velocity against a threshold of 0.85).
        value = max(value, real_actions[stat])
    return value, q


def _held_out_beyond(x: np.ndarray, episodes: np.ndarray, limit, direction: str, slack: float) -> np.ndarray:
    """Which clips fall beyond the threshold `limit(values, slack)` calibrated without their own episode
    (leave one episode out); a clip without this statistic (NaN) never does. Without two episodes, none."""
    beyond = np.zeros(len(x), bool)
    known = ~np.isnan(x)
    groups = np.unique(episodes[known])
    if len(groups) < 2:
        return beyond
    for g in groups:
        held = known & (episodes == g)
        value, _ = limit(x[known & (episodes != g)], slack)
        beyond |= held & ((x > value) if direction == "max" else (x < value))
    return beyond


def _held_out_slack(held_out_beyond, measured: int, config: FilterConfig) -> float:
    """The smallest slack on SLACK_STEPS (from config.slack to config.max_slack) whose thresholds, calibrated
    without one episode, reject at most config.held_out_rejection of that episode's clips (pooled over the
    `measured` clips that have the statistic). `held_out_beyond(slack)`: see _held_out_beyond."""
    steps = [s for s in SLACK_STEPS if config.slack <= s <= config.max_slack] or [config.slack]
    for slack in steps:
        if held_out_beyond(slack).sum() <= config.held_out_rejection * measured:
            return slack
    return steps[-1]


def _widen_for_the_stack(checks: dict, episodes: np.ndarray, slacks: dict[str, float],
                         config: FilterConfig) -> tuple[float | None, list[str]]:
    """Each check alone rejects at most held_out_rejection of the clips of episodes it was calibrated without,
    but a clip is rejected by any of them: on PushT three checks each rejected a different real clip of a
    calibration episode. While the stack as a whole rejects more than stack_held_out_rejection, widen the check
    whose next widening (up to stack_max_slack) frees the most clips, the smallest widening first; stop where
    no single check frees one (a clip that several checks reject is left to them). Updates `slacks`; returns
    the share of clips the stack then rejects held out (None without two episodes) and what it did, for
    Thresholds.notes. `checks`: stat -> its held-out rejections at a slack."""
    if not checks or len(np.unique(episodes)) < 2:
        return None, []
    beyond = {stat: held_out(slacks[stat]) for stat, held_out in checks.items()}
    rejected = np.any(list(beyond.values()), axis=0)
    notes, start = [], int(rejected.sum())
    while rejected.sum() > config.stack_held_out_rejection * len(rejected):
        best = None
        for stat, held_out in checks.items():
            if not beyond[stat].any():
                continue
            for slack in (s for s in SLACK_STEPS if slacks[stat] < s <= config.stack_max_slack):
                hits = held_out(slack)
                left = np.any([hits if k == stat else v for k, v in beyond.items()], axis=0)
                if left.sum() < rejected.sum():
                    option = (int(left.sum()), slack - slacks[stat], stat, slack, hits, left)
                    best = option if best is None or option[:2] < best[:2] else best
                    break
        if best is None:
            break
        _, _, stat, slack, hits, rejected = best
        notes.append(f"{stat}: slack {slacks[stat]:g} -> {slack:g} for the stack as a whole")
        slacks[stat], beyond[stat] = slack, hits
    notes.append(f"held out: the stack calibrated without each episode rejects {int(rejected.sum())} of its "
                 f"{len(rejected)} clips (target at most {config.stack_held_out_rejection:.0%}"
                 + (f"; {start} before widening)" if start != rejected.sum() else ")"))
    return float(rejected.mean()), notes


SLACK_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def _threshold(x: np.ndarray, direction: str, config: FilterConfig, slack: float) -> tuple[float, dict]:
    lo, med, hi = np.percentile(x, [config.percentile_lo, 50, config.percentile_hi])
    q = {"p_lo": float(lo), "p50": float(med), "p_hi": float(hi)}
    if direction == "max":
        return float(hi + slack * (hi - med)), q
    # A positive "at least" stat never asks less than a fraction of the real low percentile.
    limit = lo - slack * (med - lo)
    return float(max(limit, config.min_fraction_of_low * lo) if lo > 0 else limit), q
