"""Motion evidence from OpenCV's dense optical flow (Farneback): what the image statistics cannot see.

- *Unexplained change*: warp frame t+1 back onto frame t along the flow; what remains is change that no
  motion explains: something appearing, vanishing, jumping or the scene cutting. Measured as the local
  mean residual in a sliding window (wherever an object is, not on a fixed grid), as a spike over the same
  place's residual in the neighbouring steps, so a place where a moving object keeps leaving a residual
  (occlusions, motion blur) is not a spike.
- *Reversal*: moving pixels whose flow turns back on itself from one moving step to the next (a rewind, a
  local reordering of frames, a shuffle). Steps without motion (repeated frames of a clip resampled to a
  higher fps) are skipped, so a pause is not a reversal.

All inputs are gray frames (float, 0..255) at the analysis size; blocks are `block` x `block` pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

# Farneback settings for small frames (64 px): two pyramid levels, 9 px windows; a pixel moves at most ~8 px
# a step in the clips flywheel scores.
_FARNEBACK = dict(pyr_scale=0.5, levels=2, winsize=9, iterations=3, poly_n=5, poly_sigma=1.1, flags=0)


def flow_sequence(g: np.ndarray) -> np.ndarray:
    """Dense flow from each frame to the next, [T-1, H, W, 2] (x, y) pixels."""
    u = np.clip(np.rint(g), 0, 255).astype(np.uint8)
    return np.stack([cv2.calcOpticalFlowFarneback(u[t], u[t + 1], None, **_FARNEBACK) for t in range(len(u) - 1)])


def block_means(x: np.ndarray, block: int) -> np.ndarray:
    """Mean over block x block tiles of [T, H, W] -> [T, H // block, W // block] (edges cropped)."""
    t, h, w = x.shape
    h, w = h - h % block, w - w % block
    return x[:, :h, :w].reshape(t, h // block, block, w // block, block).mean(axis=(2, 4))


def warp_residuals(g: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """|frame t - frame t+1 sampled along the flow|, [T-1, H, W]: the change the flow does not explain."""
    h, w = g.shape[1:]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    out = np.empty((len(flow), h, w), np.float32)
    for t, f in enumerate(flow):
        back = cv2.remap(g[t + 1].astype(np.float32), gx + f[..., 0], gy + f[..., 1], cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        out[t] = np.abs(back - g[t])
    return out


def local_means(x: np.ndarray, window: int) -> np.ndarray:
    """Mean over a sliding window x window neighbourhood of each pixel of [T, H, W] (OpenCV box filter)."""
    return np.stack([cv2.boxFilter(f.astype(np.float32), -1, (window, window), borderType=cv2.BORDER_REFLECT)
                     for f in x])


def residual_spike(residual_maps: np.ndarray) -> np.ndarray:
    """Per step, the largest local residual above the same place's residual at the steps before and after
    (the larger of the two): [T-1]. `residual_maps`: [T-1, ...] local residuals (blocks or pixels). A lasting
    residual (a moving occluder) does not count; a one-step event (appearing, vanishing, jumping) does."""
    r = residual_maps.reshape(len(residual_maps), -1)
    padded = np.concatenate([r[:1] * 0, r, r[-1:] * 0])
    neighbours = np.maximum(padded[:-2], padded[2:])
    return (r - neighbours).max(axis=1)


def reversal_fraction(flow: np.ndarray, moving: np.ndarray, min_speed: float = 0.5) -> float:
    """Largest share of the frame, over consecutive *moving* steps, of pixels moving both times whose
    direction turns by more than 120 degrees."""
    steps = np.flatnonzero(moving)
    if len(steps) < 2:
        return 0.0
    speed = np.linalg.norm(flow, axis=-1)
    worst = 0.0
    for a, b in zip(steps[:-1], steps[1:]):
        both = (speed[a] > min_speed) & (speed[b] > min_speed)
        if not both.any():
            continue
        cos = (flow[a][both] * flow[b][both]).sum(-1) / (speed[a][both] * speed[b][both])
        worst = max(worst, float((cos < -0.5).sum()) / both.size)
    return worst
