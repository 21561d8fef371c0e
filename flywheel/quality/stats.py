"""Per-clip statistics, cheap to compute, all on frames resized to a fixed square (`analysis_size`).

Every statistic is a float where one direction is bad; `STAT_DIRECTION` says which ("max": larger is
worse, so a threshold is an upper bound; "min": smaller is worse). Image statistics are in gray levels
(0..255) unless said otherwise; action statistics are in units of the real data's per-dim scale.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageFilter

from flywheel.image_metrics import gray, psnr, ssim  # noqa: F401  (the one implementation; re-exported)
from flywheel.label.episodes import resize_frames
from flywheel.quality.motion import (block_means, flow_sequence, local_means, residual_spike, reversal_fraction,
                                     warp_residuals)

STAT_DIRECTION = {
    "psnr_first": "min",          # frame 0 vs the reference's frame 0 (the conditioning frame as the codec renders it), dB
    "ssim_first": "min",          # same, structural similarity on gray, 7x7 windows
    "frozen_tail": "max",         # still steps after the last moving step / steps (NaN if idle): a video that stops.
                                  # Not any still run: a robot starting from rest is still *before* it moves
    "idle": "max",                # 1 if no step moves (see `idle_allowed` in calibration), else 0
    "flicker": "max",             # max |second difference| of the brightness, relative to the reference's
    "border_drift": "max",        # max change of the border strip's mean colour vs frame 0, beyond the reference's
    "unexplained_change": "max",  # largest one-step spike of flow-compensated residual, locally (motion.py)
    "reversal": "max",            # share of the frame whose motion turns back between consecutive moving steps
    "order_ratio": "max",         # local order: the smaller of two consecutive steps' moved change / the step across both
    "lag_ratio": "max",           # consecutive-frame diff / diff at lag T//2: ~1 when frame order is lost
    "sharpness_ratio": "min",     # median Laplacian variance of the frames / that of the reference
    "exposure_shift": "max",      # max over frames of |brightness - the reference frame's brightness|
    "clipped_increase": "max",    # fraction of saturated (<=2 or >=253) pixels, minus the reference's
    "noise_ratio": "max",         # high-frequency energy (|frame - its 3x3 median|) / the reference's
    "colour_shift": "max",        # max Bhattacharyya distance of a frame's chroma histogram to the reference's
    "action_range": "max",        # how far actions leave the real [p0.5, p99.5] range, in real stds
    "action_velocity": "max",     # max |da/dt| / real p99 |da/dt|, over steps and dims
    "action_jerk": "max",         # max |d3a/dt3| / real p99, over steps and dims
    "idm_disagreement": "max",    # mean per-step disagreement between overlapping IDM windows
}

# Values a statistic cannot pass: a threshold at or beyond its bound can never fire (reported at calibration).
STAT_BOUNDS = {"frozen_tail": 1.0, "idle": 1.0, "reversal": 1.0, "colour_shift": 1.0, "ssim_first": -1.0,
               "psnr_first": 0.0, "sharpness_ratio": 0.0, "clipped_increase": 1.0}

def laplacian_variance(g: np.ndarray) -> float:
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def step_diffs(g: np.ndarray, lag: int = 1) -> np.ndarray:
    """Mean |g[t+lag] - g[t]| per t, gray levels."""
    return np.abs(g[lag:] - g[:-lag]).mean(axis=(1, 2))


def _chroma_hist(frame: np.ndarray, bins: int = 16) -> np.ndarray:
    ycc = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb)
    h = cv2.calcHist([ycc], [1, 2], None, [bins, bins], [0, 256, 0, 256])
    return h / max(float(h.sum()), 1.0)


def _high_frequency(g: np.ndarray) -> float:
    """Mean |image - its 3x3 median| over frames: noise and fine texture, robust to edges."""
    u = np.clip(np.rint(g), 0, 255).astype(np.uint8)
    return float(np.median([np.abs(x - cv2.medianBlur(ux, 3).astype(np.float32)).mean() for x, ux in zip(g, u)]))


def _border_mean(v: np.ndarray, b: int) -> np.ndarray:
    t = len(v)
    strips = [v[:, :b].reshape(t, -1, 3), v[:, -b:].reshape(t, -1, 3), v[:, :, :b].reshape(t, -1, 3),
              v[:, :, -b:].reshape(t, -1, 3)]
    return np.concatenate(strips, axis=1).astype(np.float32).mean(axis=1)  # [T, 3]


def video_stats(frames: np.ndarray, first_frame: np.ndarray, size: int = 64, static_eps: float = 1.0,
                reference: np.ndarray | None = None, still_factor: float = 1.5) -> dict[str, float]:
    """The image statistics of one clip (uint8 [T,H,W,3]) given its conditioning frame (uint8 [H',W',3]).

    `reference`: a still clip of the conditioning frame as the model's codec renders it ([T',H',W',3]: the
    codec's own blur, colour and drift over time, which every generated clip shares); None = the raw
    conditioning frame, repeated. Statistics are measured against it, frame by frame, so what the codec
    does to a scene where nothing moves is not counted as a defect while what the generator adds is.
    A step is still when its largest 8x8-block mean change is below max(static_eps, still_factor x the
    reference's at that step)."""
    v = resize_frames(frames, size)
    ref = resize_frames(np.repeat(np.asarray(first_frame)[None], len(v), axis=0) if reference is None
                        else np.asarray(reference), size)
    ref = ref[np.minimum(np.arange(len(v)), len(ref) - 1)]
    g, r = gray(v), gray(ref)
    block = max(2, size // 8)
    steps = block_means(np.abs(np.diff(g, axis=0)), block).reshape(len(g) - 1, -1)
    ref_steps = block_means(np.abs(np.diff(r, axis=0)), block).reshape(len(r) - 1, -1)
    local, drift = steps.max(axis=1), ref_steps.max(axis=1)
    still = local < np.maximum(static_eps, still_factor * drift)
    flow = flow_sequence(g)
    # Not the border strip: what enters or leaves the view (an arm swinging out past the frame's edge) has
    # no flow to explain it but is no defect (measured on G1: a real clip whose arm leaves through the top
    # right corner spiked to 47.5 gray levels, ~5 without a one-block margin; teleports score 45-130).
    inner = (slice(None), slice(block, -block), slice(block, -block))
    warped = warp_residuals(g, flow)
    residual = local_means(warped, block)[inner]
    # A raw reference is one frame repeated: nothing moves, nothing to explain.
    ref_residual = (np.zeros_like(residual) if reference is None
                    else local_means(warp_residuals(r, flow_sequence(r)), block)[inner])
    skip = block_means(np.abs(g[2:] - g[:-2]), block).reshape(len(g) - 2, -1).max(axis=1) if len(g) > 2 else local[:0]
    # Local order counts the change that motion explains: a small object that fades and returns (the codec's
    # rendering of PushT's moving agent) changes a block twice with no motion, as a swapped frame does, and
    # read as a reordering (a held-out clean clip at 1.02 against 0.90); a swap or rewind moves things.
    moved = (steps - block_means(warped, block).reshape(len(g) - 1, -1)).clip(min=0).max(axis=1)
    floor = np.maximum(static_eps, still_factor * np.maximum(drift[:-1], drift[1:]))
    lag = max(2, len(g) // 2)
    d_far = step_diffs(g, lag) if len(g) > lag else step_diffs(g)
    brightness, ref_brightness = g.mean(axis=(1, 2)), r.mean(axis=(1, 2))
    relative = brightness - ref_brightness
    b = max(2, size // 8)
    border, ref_border = _border_mean(v, b), _border_mean(ref, b)
    sharp = np.median([laplacian_variance(x) for x in g])
    ref_sharp = np.median([laplacian_variance(x) for x in r])
    clipped = lambda x: float(((x <= 2) | (x >= 253)).mean())  # noqa: E731
    ref_hist = [_chroma_hist(x) for x in ref]
    return {
        "psnr_first": psnr(v[0], ref[0]),
        "ssim_first": ssim(g[0], r[0]),
        "motion": float(np.median(step_diffs(g))),  # recorded for browsing, not judged
        "frozen_tail": np.nan if still.all() else (len(still) - 1 - int(np.flatnonzero(~still)[-1])) / len(still),
        "idle": float(still.all()),
        "flicker": float(np.abs(np.diff(relative, 2)).max()) if len(g) >= 3 else 0.0,
        "border_drift": float(np.abs(border - border[:1]).max() - np.abs(ref_border - ref_border[:1]).max()),
        "unexplained_change": float(residual_spike(residual).max() - max(residual_spike(ref_residual).max(), 0.0)),
        "reversal": reversal_fraction(flow, ~still),
        "order_ratio": float((np.minimum(moved[:-1], moved[1:]) / np.maximum(skip, floor)).max()) if len(g) > 2 else 0.0,
        "lag_ratio": float(max(step_diffs(g).mean(), static_eps) / max(d_far.mean(), static_eps)),
        "sharpness_ratio": float(sharp / max(ref_sharp, 1e-6)),
        "exposure_shift": float(np.abs(relative).max()),
        "clipped_increase": float(np.mean([clipped(x) for x in g]) - np.mean([clipped(x) for x in r])),
        "noise_ratio": float(_high_frequency(g) / max(_high_frequency(r), 0.05)),
        "colour_shift": float(max(cv2.compareHist(_chroma_hist(x), h, cv2.HISTCMP_BHATTACHARYYA)
                                  for x, h in zip(v, ref_hist))),
    }


def action_stats(actions: np.ndarray, fps: float, reference: dict) -> dict[str, float]:
    """Action sanity against the real data: `reference` has per-dim lo, hi, scale, vel_p99, jerk_p99 (lists)."""
    a = np.asarray(actions, dtype=np.float64)
    lo, hi, scale = (np.asarray(reference[k]) for k in ("lo", "hi", "scale"))
    out = np.maximum(a - hi, lo - a).clip(min=0) / scale
    vel = np.abs(np.diff(a, axis=0)) * fps if len(a) > 1 else np.zeros((1, a.shape[1]))
    jerk = np.abs(np.diff(a, 3, axis=0)) * fps**3 if len(a) > 3 else np.zeros((1, a.shape[1]))
    return {
        "action_range": float(out.max()),
        "action_velocity": float((vel / np.asarray(reference["vel_p99"])).max()),
        "action_jerk": float((jerk / np.asarray(reference["jerk_p99"])).max()),
    }


def action_reference(actions: list[np.ndarray], fps: float) -> dict:
    """Per-dim scales of real actions (list of [T, D] episodes at `fps`) for `action_stats`."""
    cat = np.concatenate(actions).astype(np.float64)
    vel = np.concatenate([np.abs(np.diff(a, axis=0)) * fps for a in actions if len(a) > 1])
    jerk = np.concatenate([np.abs(np.diff(a, 3, axis=0)) * fps**3 for a in actions if len(a) > 3])
    eps = 1e-6
    return {
        "lo": np.percentile(cat, 0.5, axis=0).tolist(),
        "hi": np.percentile(cat, 99.5, axis=0).tolist(),
        # A joint that barely moves in the real data must not make every small deviation "many stds".
        "scale": np.maximum(cat.std(0), 0.1 * np.median(cat.std(0)) + eps).tolist(),
        "vel_p99": np.maximum(np.percentile(vel, 99, axis=0), eps).tolist(),
        "jerk_p99": np.maximum(np.percentile(jerk, 99, axis=0), eps).tolist(),
        "fps": fps,
    }


def dhash(frame: np.ndarray, bits: int = 8) -> np.ndarray:
    """Difference hash: bits x bits booleans, 'is this pixel brighter than its right neighbour'."""
    small = np.asarray(Image.fromarray(frame).convert("L").resize((bits + 1, bits), Image.BILINEAR), dtype=np.int16)
    return (small[:, 1:] > small[:, :-1]).ravel()


def clip_hash(frames: np.ndarray) -> np.ndarray:
    """128-bit perceptual hash of a clip from its middle and last frames. Not the first frame: seeds of one
    prompt share the conditioning frame, so only what they generate can tell them apart."""
    return np.concatenate([dhash(frames[len(frames) // 2]), dhash(frames[-1])])


def blur(frames: np.ndarray, radius: float) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(radius))) for f in frames])
