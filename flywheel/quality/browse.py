"""Look at what the filters did: a contact sheet of clips with their reasons, a score plot per statistic
(real-data quantiles, threshold, each clip), and the per-clip table saved next to them. Rejected clips
are never deleted: the table points at their videos."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from flywheel.preview import contact_sheet
from flywheel.quality.calibration import Thresholds
from flywheel.store import atomic_write_bytes

KIND_COLOURS = [(30, 30, 30), (220, 40, 40), (40, 90, 220), (30, 160, 60), (200, 120, 0), (150, 50, 180),
                (0, 160, 160), (120, 120, 0), (230, 90, 160), (100, 100, 100)]


def _save_png(img: Image.Image, path: str | Path) -> Path:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())



def score_plot(results: pd.DataFrame, thresholds: Thresholds, path: str | Path, group_col: str = "kind") -> Path:
    """One strip per statistic: each clip a dot coloured by `group_col`, the threshold a red line, the real
    [p_lo, p_hi] band grey. Log scale where values span decades."""
    limits = results.attrs.get("thresholds", thresholds.values)
    stats = [s for s in limits if s in results.columns and results[s].notna().any()]
    groups = sorted(results[group_col].astype(str).unique())
    w, h, left = 520, 54, 130
    img = Image.new("RGB", (left + w + 20, 30 + len(stats) * h + 16 * len(groups)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((6, 6), f"filter scores (red = threshold, grey = real p_lo..p_hi), filter v{thresholds.filter_version}",
              fill=(0, 0, 0))
    for r, stat in enumerate(stats):
        y = 30 + r * h
        vals = results[stat].to_numpy(dtype=float)
        q = thresholds.real_quantiles.get(stat, {})
        span = np.concatenate([vals[~np.isnan(vals)], [limits[stat]], list(q.values())])
        log = span.min() > 0 and span.max() / max(span.min(), 1e-12) > 100
        f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log else (lambda v: np.asarray(v, float))
        lo, hi = float(np.min(f(span))), float(np.max(f(span)))
        hi = hi if hi > lo else lo + 1
        x = lambda v: left + (f(v) - lo) / (hi - lo) * w  # noqa: E731
        draw.text((4, y + 14), stat + (" (log)" if log else ""), fill=(0, 0, 0))
        draw.line([(left, y + 40), (left + w, y + 40)], fill=(200, 200, 200))
        if q:
            draw.rectangle([x(q["p_lo"]), y + 6, max(x(q["p_hi"]), x(q["p_lo"]) + 1), y + 38], fill=(225, 225, 225))
        tx = float(x(limits[stat]))
        draw.line([(tx, y + 2), (tx, y + 42)], fill=(220, 0, 0), width=2)
        for gi, g in enumerate(groups):
            sel = (results[group_col].astype(str) == g).to_numpy() & ~np.isnan(vals)
            for v in vals[sel]:
                cx, cy = float(x(v)), y + 10 + (gi * 5) % 28
                draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=KIND_COLOURS[gi % len(KIND_COLOURS)])
    for gi, g in enumerate(groups):
        y = 30 + len(stats) * h + gi * 16
        draw.rectangle([left, y + 3, left + 8, y + 11], fill=KIND_COLOURS[gi % len(KIND_COLOURS)])
        draw.text((left + 14, y), g, fill=(0, 0, 0))
    return _save_png(img, path)


def write_browse(results: pd.DataFrame, out_dir: str | Path, thresholds: Thresholds,
                 frames: dict[str, np.ndarray] | None = None, max_rows: int = 60) -> dict[str, Path]:
    """results.parquet (every clip, every score, reasons), rejected.png (contact sheet of rejected clips,
    when their frames are given), scores.png. Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    results.drop(columns=[c for c in results.columns if results[c].dtype == object and c not in
                          ("clip_id", "group", "kind", "decode_error", "reasons", "filter_version")]).to_parquet(buf)
    paths = {"results": atomic_write_bytes(out_dir / "results.parquet", buf.getvalue()),
             "scores": score_plot(results, thresholds, out_dir / "scores.png")}
    rejected = results[~results["accepted"]]
    if frames is not None and len(rejected):
        rows = [r for r in rejected.itertuples() if r.clip_id in frames][:max_rows]
        paths["rejected"] = contact_sheet([frames[r.clip_id] for r in rows],
                                          [f"{r.clip_id}: {r.reasons}" for r in rows], out_dir / "rejected.png",
                                          frames_per_video=4, scale=64 / frames[rows[0].clip_id].shape[1],
                                          min_width=720)
    return paths

