"""PSNR and SSIM: the one implementation flywheel measures images with (the adapter evaluation, the model-fit
check, the quality filters, the tiny-pusht recipe and the GPU benchmarks). numpy only, so the recipe and the
benchmarks can use it on a bare GPU host."""

from __future__ import annotations

import math

import numpy as np


def gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 luma (BT.601) [...]."""
    return frames[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0, cap: float | None = 60.0) -> float:
    """Peak signal-to-noise ratio in dB (float64). `cap`: the value for identical images and the most any pair
    reads (None: uncapped, identical images read as an MSE of 1e-10, so a frozen clip stays far above any real
    one)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if cap is None:
        return 10 * math.log10(peak**2 / max(mse, 1e-10))
    return cap if mse <= 1e-10 else min(cap, 10 * math.log10(peak**2 / mse))


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
