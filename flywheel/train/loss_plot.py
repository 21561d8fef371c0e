"""The training loss curve as a PNG (PIL only): raw per-step loss in light blue, a moving average in dark blue."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 400
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 45
RAW_COLOUR = (158, 202, 225)
SMOOTH_COLOUR = (8, 81, 156)
GRID_COLOUR = (225, 225, 225)
TEXT_COLOUR = (40, 40, 40)


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def draw_loss_curve(losses: list[float], title: str = "training loss") -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((MARGIN_LEFT, 12), title, fill=TEXT_COLOUR, font=font)
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        draw.text((WIDTH // 2 - 40, HEIGHT // 2), "no finite losses", fill=TEXT_COLOUR, font=font)
        return image
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    y0, y1 = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    n = len(losses)

    def point(i: int, v: float) -> tuple[float, float]:
        x = x0 + (x1 - x0) * (i / max(n - 1, 1))
        y = y1 - (y1 - y0) * ((min(max(v, lo), hi) - lo) / (hi - lo))
        return x, y

    for k in range(5):
        frac = k / 4
        y = y1 - (y1 - y0) * frac
        draw.line([(x0, y), (x1, y)], fill=GRID_COLOUR)
        draw.text((6, y - 6), _fmt(lo + (hi - lo) * frac), fill=TEXT_COLOUR, font=font)
    draw.rectangle([x0, y0, x1, y1], outline=TEXT_COLOUR)
    draw.text((x0, y1 + 8), "step 1", fill=TEXT_COLOUR, font=font)
    draw.text((x1 - 60, y1 + 8), f"step {n}", fill=TEXT_COLOUR, font=font)

    raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
    smooth_window = min(n, max(5, n // 20))
    smooth = [point(i, v) for i, v in enumerate(moving_average(finite, smooth_window))] if len(finite) == n else []
    if len(raw) > 1:
        draw.line(raw, fill=RAW_COLOUR, width=1)
    if len(smooth) > 1:
        draw.line(smooth, fill=SMOOTH_COLOUR, width=2)
    draw.text((x1 - 230, 12), f"last {_fmt(losses[-1])}   dark: mean of {smooth_window} steps", fill=SMOOTH_COLOUR, font=font)
    return image


def write_loss_plot(losses: list[float], path: Path, title: str = "training loss") -> Path:
    path = Path(path)
    draw_loss_curve(losses, title).save(path, format="PNG")
    return path
