"""Can the model's VAE show this data? Round-trip a few real clips through it and measure what comes back.

Every generated frame leaves the model through its VAE decoder, so a VAE that cannot reconstruct the
domain's real video (tiny-pusht, trained on 64x64 PushT renders, turns a real Unitree G1 camera into a
PushT-coloured sketch at about 6 dB) makes every later number meaningless: the adapter learns sketches, the
filters are calibrated on sketches. This module only measures; the decision (a floor, a refusal) is the
caller's.

    fit = clip_set_fit(pipe, clip_set)                 # after training_clips (clips already at the model size)
    fit = manifest_fit(pipe, manifest.frame, ClipConfig())   # straight from the ingest manifest's episodes
    fit.psnr_db, fit.ssim, fit.clips                     # means, and per clip what was sampled and measured

Clips are spread over episodes (the first clip of evenly spaced episodes first), measured at the model's
clip size on the part of the frame that shows the picture (the bars of an aspect-keeping "pad" resize are
not data: a VAE that reproduces them would flatter itself, one that paints its training floor into them,
as tiny-pusht does, would be blamed for them). PSNR is over the whole clip,
SSIM the mean over frames; both from flywheel.quality.stats, the project's one implementation.

Proposed floors (benchmarks/model_fit.py, benchmarks/results/model-fit.md): tiny-pusht on PushT measures
far above them, tiny-pusht on real G1 video and the random-weight `tiny` far below.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from flywheel.errors import DataError
from flywheel.model.encode import codec_roundtrips, pipeline_preset
from flywheel.image_metrics import gray, psnr, ssim

if TYPE_CHECKING:
    from flywheel.data.clips import ClipConfig, ClipSet

DEFAULT_MAX_CLIPS = 4
# Proposed defaults for a fit check (see the module docstring for where they come from).
DEFAULT_MIN_PSNR_DB = 20.0
DEFAULT_MIN_SSIM = 0.5


@dataclasses.dataclass(frozen=True)
class ClipFit:
    clip_id: str
    episode_id: str
    psnr_db: float
    ssim: float


@dataclasses.dataclass(frozen=True)
class FitMeasurement:
    """What the preset's VAE made of `clips` (means over them; per clip in `clips`)."""

    preset: str
    model_id: str
    revision: str | None
    psnr_db: float
    ssim: float
    clips: list[ClipFit]
    source: str                 # the clip set or manifest the clips were sampled from
    clip_shape: list[int]       # [frames, height, width] the VAE saw
    seconds: float

    @property
    def psnr_db_min(self) -> float:
        return min(c.psnr_db for c in self.clips)

    @property
    def ssim_min(self) -> float:
        return min(c.ssim for c in self.clips)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(psnr_db_min=self.psnr_db_min, ssim_min=self.ssim_min, num_clips=len(self.clips))
        return d

    def metadata(self) -> dict[str, float | int | str]:
        """Flat scalars for run metadata (Dagster, MLflow)."""
        return {"fit_preset": self.preset, "fit_psnr_db": round(self.psnr_db, 3), "fit_ssim": round(self.ssim, 4),
                "fit_psnr_db_min": round(self.psnr_db_min, 3), "fit_ssim_min": round(self.ssim_min, 4),
                "fit_clips": len(self.clips), "fit_clip_ids": ",".join(c.clip_id for c in self.clips)}


def measure_fit(pipe, clips: list[np.ndarray], clip_ids: list[str], episode_ids: list[str] | None = None,
                boxes: list[tuple[int, int, int, int]] | None = None, source: str = "") -> FitMeasurement:
    """Round-trip uint8 clips [T, H, W, 3] through the pipeline's VAE (`codec_roundtrips`) and compare each
    with itself, inside its content box (top, left, height, width; default the whole frame)."""
    if not clips:
        raise DataError(f"{source or 'measure_fit'}: no clips to measure the model's fit on")
    if len(clip_ids) != len(clips) or (boxes is not None and len(boxes) != len(clips)):
        raise ValueError(f"measure_fit: {len(clips)} clips, {len(clip_ids)} ids, "
                         f"{len(boxes) if boxes is not None else 'no'} boxes; give one of each per clip")
    preset = pipeline_preset(pipe)
    started = time.perf_counter()
    rendered = codec_roundtrips(pipe, clips)
    per_clip = []
    for i, (real, back) in enumerate(zip(clips, rendered)):
        top, left, h, w = boxes[i] if boxes is not None else (0, 0, real.shape[1], real.shape[2])
        real, back = real[:, top:top + h, left:left + w], back[:, top:top + h, left:left + w]
        per_clip.append(ClipFit(str(clip_ids[i]), str(episode_ids[i]) if episode_ids else "",
                                float(psnr(back, real)),
                                float(np.mean([ssim(a, b) for a, b in zip(gray(back), gray(real))]))))
    return FitMeasurement(
        preset=preset.name, model_id=preset.model_id, revision=preset.revision,
        psnr_db=float(np.mean([c.psnr_db for c in per_clip])), ssim=float(np.mean([c.ssim for c in per_clip])),
        clips=per_clip, source=source, clip_shape=list(clips[0].shape[:3]),
        seconds=round(time.perf_counter() - started, 3))


def spread_over_episodes(table: pd.DataFrame, max_clips: int) -> pd.DataFrame:
    """Up to `max_clips` rows, deterministic: the first row of evenly spaced episodes, then (with fewer
    episodes than clips) evenly spaced further rows. `table` needs episode_id; row order is kept within."""
    if max_clips < 1:
        raise ValueError(f"max_clips must be >= 1, got {max_clips}")
    firsts = table.drop_duplicates("episode_id")
    picked = _evenly(firsts, max_clips)
    if len(picked) < max_clips:
        rest = table.drop(index=picked.index)
        picked = pd.concat([picked, _evenly(rest, max_clips - len(picked))])
    return table.loc[sorted(picked.index, key=list(table.index).index)]


def _evenly(table: pd.DataFrame, count: int) -> pd.DataFrame:
    if len(table) <= count:
        return table
    return table.iloc[sorted(set(np.linspace(0, len(table) - 1, count).round().astype(int).tolist()))]


def clip_set_fit(pipe, clip_set: ClipSet, max_clips: int = DEFAULT_MAX_CLIPS) -> FitMeasurement:
    """The fit on `max_clips` clips of a prepared clip set (any split), read back from their mp4 files."""
    from flywheel.data.clips import clip_content_box
    from flywheel.data.video import read_frames

    rows = spread_over_episodes(clip_set.frame.sort_values(["episode_index", "start_frame"], kind="stable"), max_clips)
    clips = [read_frames(Path(clip_set.path) / v) for v in rows["video"]]
    return measure_fit(pipe, clips, rows["clip_id"].tolist(), rows["episode_id"].tolist(),
                       [clip_content_box(r) for _, r in rows.iterrows()], source=str(clip_set.path))


def manifest_fit(pipe, manifest: pd.DataFrame, clip_config: ClipConfig | None = None,
                 max_clips: int = DEFAULT_MAX_CLIPS, source: str = "") -> FitMeasurement:
    """The fit on the first clip of up to `max_clips` of an ingest manifest's episodes, made as the clips
    stage makes clips (`clip_config`, the preset's size and fps) but only that head of each episode decoded."""
    from flywheel.data.clips import ClipConfig, content_box, episode_frames, resolve_spec, safe_name

    config = clip_config or ClipConfig()
    spec = resolve_spec(config, pipeline_preset(pipe))
    clips, ids, episodes, boxes = [], [], [], []
    ordered = manifest.sort_values(["episode_index", "episode_id"], kind="stable")
    chosen = _evenly(ordered, max_clips)  # evenly spaced episodes; the others stand in for any too short
    for _, row in pd.concat([chosen, ordered.drop(index=chosen.index)]).iterrows():
        if len(clips) == max_clips:
            break
        head = row.copy()
        # one clip's worth of time (+ a source frame of slack for the nearest-frame resampling)
        head["to_timestamp"] = min(float(row["to_timestamp"]),
                                   float(row["from_timestamp"]) + spec.num_frames / spec.fps + 1.0 / float(row["fps"]))
        frames, _, source_size = episode_frames(head, spec, config.resize)
        if len(frames) < spec.num_frames:
            continue  # shorter than one clip: the clips stage skips it too
        clips.append(frames[:spec.num_frames])
        ids.append(f"{safe_name(str(row['episode_id']))}-f00000")
        episodes.append(str(row["episode_id"]))
        boxes.append(content_box(*source_size, spec.height, spec.width, config.resize))
    return measure_fit(pipe, clips, ids, episodes, boxes, source=source or "manifest")
