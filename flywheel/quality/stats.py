"""Per-clip statistics, cheap to compute, all on frames resized to a fixed square (`analysis_size`).

Every statistic is a float where one direction is bad; `STAT_DIRECTION` says which ("max": larger is
worse, so a threshold is an upper bound; "min": smaller is worse). Image statistics are in gray levels
(0..255) unless said otherwise; action statistics are in units of the real data's per-dim scale.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from flywheel.label.episodes import resize_frames

STAT_DIRECTION = {
    "psnr_first": "min",        # frame 0 vs the conditioning frame, dB (capped at 60)
    "ssim_first": "min",        # same, structural similarity on gray, 7x7 windows
    "motion": "min",            # median over steps of mean |frame_t+1 - frame_t|
    "static_fraction": "max",   # fraction of steps with mean |diff| < static_eps
    "flicker": "max",           # max |second difference| of the global mean brightness
    "border_drift": "max",      # max change of the border strip's mean colour vs frame 0
    "jump_ratio": "max",        # largest step diff / median step diff: teleports, cuts
    "lag_ratio": "max",         # consecutive-frame diff / diff at lag T//2: ~1 when frame order is lost
    "sharpness_ratio": "min",   # median Laplacian variance of the frames / that of the conditioning frame
    "exposure_shift": "max",    # |mean brightness of the clip - of the conditioning frame|
    "clipped_increase": "max",  # fraction of saturated (<=2 or >=253) pixels, minus the conditioning frame's
    "action_range": "max",      # how far actions leave the real [p0.5, p99.5] range, in real stds
    "action_velocity": "max",   # max |da/dt| / real p99 |da/dt|, over steps and dims
    "action_jerk": "max",       # max |d3a/dt3| / real p99, over steps and dims
    "idm_disagreement": "max",  # mean per-step disagreement between overlapping IDM windows
}


def gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 luma (BT.601) [...]."""
    return frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def psnr(a: np.ndarray, b: np.ndarray, cap: float = 60.0) -> float:
    mse = float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2))
    return cap if mse <= 1e-10 else min(cap, 10 * np.log10(255.0**2 / mse))


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k windows ('valid'), via a 2-D cumulative sum."""
    c = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, k: int = 7) -> float:
    """Mean SSIM of two gray images (float, 0..255) with uniform k x k windows."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _box(a, k), _box(b, k)
    var_a = _box(a * a, k) - mu_a**2
    var_b = _box(b * b, k) - mu_b**2
    cov = _box(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def laplacian_variance(g: np.ndarray) -> float:
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def step_diffs(g: np.ndarray, lag: int = 1) -> np.ndarray:
    """Mean |g[t+lag] - g[t]| per t, gray levels."""
    return np.abs(g[lag:] - g[:-lag]).mean(axis=(1, 2))


def video_stats(frames: np.ndarray, first_frame: np.ndarray, size: int = 64, static_eps: float = 0.5) -> dict[str, float]:
    """The image statistics of one clip (uint8 [T,H,W,3]) given its conditioning frame (uint8 [H',W',3])."""
    v = resize_frames(frames, size)
    cond = resize_frames(np.asarray(first_frame)[None], size)[0]
    g, gc = gray(v), gray(cond)
    d1 = step_diffs(g)
    lag = max(2, len(g) // 2)
    d_far = step_diffs(g, lag) if len(g) > lag else d1
    brightness = g.mean(axis=(1, 2))
    b = max(2, size // 8)
    border = np.concatenate([v[:, :b].reshape(len(v), -1, 3), v[:, -b:].reshape(len(v), -1, 3),
                             v[:, :, :b].reshape(len(v), -1, 3), v[:, :, -b:].reshape(len(v), -1, 3)], axis=1)
    border_mean = border.astype(np.float32).mean(axis=1)  # [T, 3]
    sharp = np.array([laplacian_variance(x) for x in g])
    clipped = lambda x: float(((x <= 2) | (x >= 253)).mean())  # noqa: E731
    # The floor keeps ratios of near-static clips finite; encoding noise alone is about this large.
    floor = static_eps
    return {
        "psnr_first": psnr(v[0], cond),
        "ssim_first": ssim(g[0], gc),
        "motion": float(np.median(d1)),
        "static_fraction": float(np.mean(d1 < static_eps)),
        "flicker": float(np.abs(np.diff(brightness, 2)).max()) if len(brightness) >= 3 else 0.0,
        "border_drift": float(np.abs(border_mean - border_mean[:1]).max()),
        "jump_ratio": float(d1.max() / max(np.median(d1), floor)),
        "lag_ratio": float(max(d1.mean(), floor) / max(d_far.mean(), floor)),
        "sharpness_ratio": float(np.median(sharp) / max(laplacian_variance(gc), 1e-6)),
        "exposure_shift": float(abs(brightness.mean() - gc.mean())),
        "clipped_increase": float(np.mean([clipped(x) for x in g]) - clipped(gc)),
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
