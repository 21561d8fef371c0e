"""Is the synthetic data useful? Train the same model with the same budget on real-only and on
real + accepted synthetic episodes, several seeds each, and compare the error on held-out *real*
episodes. The gate fails when synthetic data makes held-out real error worse beyond a tolerance.

The model is the IDM (flywheel.label): its held-out real action error is the number compared. Both arms
use the same real training episodes, the same held-out real episodes, the same seeds and the same number
of gradient steps; only the synthetic episodes differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from flywheel.label.episodes import load_episodes
from flywheel.label.idm import evaluate_idm, fit_idm, split_episodes
from flywheel.refresh.config import UsefulnessConfig
from flywheel.refresh.provenance import read_provenance
from flywheel.store import atomic_write_bytes

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class UsefulnessResult:
    table: pd.DataFrame        # one row per (arm, seed)
    summary: dict              # per arm mean and 95% interval, paired difference, gate decision
    gate_passed: bool
    table_path: Path
    summary_path: Path
    plot_path: Path


def interval95(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high); a single value has no interval (low = high = mean)."""
    x = np.asarray(x, dtype=float)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    half = T95.get(len(x) - 1, 1.96) * float(x.std(ddof=1)) / np.sqrt(len(x))
    return m, m - half, m + half


def split_real_synthetic(root: str | Path) -> tuple[list[int], list[int]]:
    """(real, synthetic) episode indices of a refreshed dataset, from its provenance file."""
    prov = read_provenance(root)
    if prov is None:
        raise FileNotFoundError(f"{root}: no provenance.parquet; pass a dataset written by refresh_dataset")
    real = prov.loc[~prov["is_synthetic"], "episode_index"].astype(int).tolist()
    synth = prov.loc[prov["is_synthetic"], "episode_index"].astype(int).tolist()
    return real, synth


def usefulness_report(refreshed_root: str | Path, config: UsefulnessConfig, out_dir: str | Path,
                      progress: Callable[[dict], None] | None = None,
                      cache_dir: str | Path | None = None) -> UsefulnessResult:
    """Train real-only and real+synthetic arms on a refreshed dataset; write usefulness.csv/.json/.png."""
    out_dir = Path(out_dir)
    real_ids, synth_ids = split_real_synthetic(refreshed_root)
    if not synth_ids:
        raise ValueError(f"{refreshed_root}: no synthetic episodes; nothing to compare")
    idm_cfg = config.idm.model_copy(update={"episodes": config.idm.episodes or real_ids})
    train_ids, val_ids = split_episodes(real_ids, idm_cfg)
    load = dict(image_size=idm_cfg.image_size, camera_key=idm_cfg.camera_key, action_key=idm_cfg.action_key,
                cache_dir=cache_dir)
    real_train = load_episodes(refreshed_root, train_ids, **load)
    val = load_episodes(refreshed_root, val_ids, **load)
    synthetic = load_episodes(refreshed_root, synth_ids, **load)
    arms = {"real_only": real_train, "real_plus_synthetic": real_train + synthetic}
    rows = []
    for seed in config.seeds:
        for arm, episodes in arms.items():
            model, _ = fit_idm(episodes, idm_cfg.model_copy(update={"seed": seed}), progress=progress or (lambda _: None))
            # Both arms are scored against the same baseline: the real training mean.
            metrics, _ = evaluate_idm(model, val, np.concatenate([e.actions for e in real_train]).mean(0))
            rows.append(dict(arm=arm, seed=seed, mae_mean=metrics["mae_mean"],
                             baseline_mae_mean=metrics["baseline_mae_mean"], train_episodes=len(episodes),
                             train_frames=int(sum(len(e) for e in episodes)), steps=idm_cfg.steps))
            if progress is not None:
                progress(dict(stage="usefulness", arm=arm, seed=seed, mae_mean=metrics["mae_mean"]))
    table = pd.DataFrame(rows)
    summary = summarise(table, config.tolerance)
    summary.update(val_episodes=val_ids, train_episodes=train_ids, synthetic_episodes=synth_ids,
                   refreshed_root=str(refreshed_root), config=config.model_dump())
    table_path = atomic_write_bytes(out_dir / "usefulness.csv", table.to_csv(index=False).encode())
    summary_path = atomic_write_bytes(out_dir / "usefulness.json", json.dumps(summary, indent=2).encode())
    plot_path = plot_usefulness(table, summary, out_dir / "usefulness.png")
    return UsefulnessResult(table, summary, summary["gate_passed"], table_path, summary_path, plot_path)


def summarise(table: pd.DataFrame, tolerance: float) -> dict:
    arms = {}
    for arm, g in table.groupby("arm"):
        m, lo, hi = interval95(g["mae_mean"].to_numpy())
        arms[arm] = dict(mean=m, ci95=[lo, hi], n=len(g))
    paired = table.pivot(index="seed", columns="arm", values="mae_mean")
    diff = (paired["real_plus_synthetic"] - paired["real_only"]).to_numpy()
    d, dlo, dhi = interval95(diff)
    real, synth = arms["real_only"]["mean"], arms["real_plus_synthetic"]["mean"]
    return dict(arms=arms, paired_difference=dict(mean=d, ci95=[dlo, dhi]),
                relative_change=(synth - real) / real if real else float("nan"), tolerance=tolerance,
                gate_passed=bool(synth <= real * (1 + tolerance)),
                gate_rule=f"real+synthetic held-out error <= real-only x (1 + {tolerance})")


def plot_usefulness(table: pd.DataFrame, summary: dict, path: str | Path) -> Path:
    """Per arm: each seed a dot, the mean a bar, the 95% interval a whisker; gate verdict in the title."""
    w, h, left, top = 520, 300, 70, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    verdict = "PASS" if summary["gate_passed"] else "FAIL"
    draw.text((8, 8), f"held-out real action MAE (lower is better)  gate: {verdict} "
                      f"(tol {summary['tolerance']:.0%}, change {summary['relative_change']:+.1%})", fill=(0, 0, 0))
    vals = np.concatenate([table["mae_mean"].to_numpy(), *[a["ci95"] for a in summary["arms"].values()]])
    lo, hi = float(vals.min()) * 0.95, float(vals.max()) * 1.05
    hi = hi if hi > lo else lo + 1
    y = lambda v: top + (hi - v) / (hi - lo) * (h - top - 40)  # noqa: E731
    draw.line([(left, top), (left, h - 40), (w - 10, h - 40)], fill=(120, 120, 120))
    draw.text((4, top - 4), f"{hi:.4g}", fill=(90, 90, 90))
    draw.text((4, h - 46), f"{lo:.4g}", fill=(90, 90, 90))
    colours = {"real_only": (40, 90, 220), "real_plus_synthetic": (220, 120, 0)}
    for i, (arm, stats) in enumerate(summary["arms"].items()):
        cx = left + 90 + i * 200
        c = colours.get(arm, (0, 0, 0))
        draw.rectangle([cx - 30, y(stats["mean"]), cx + 30, h - 40], outline=c, width=2)
        draw.line([(cx, y(stats["ci95"][0])), (cx, y(stats["ci95"][1]))], fill=(0, 0, 0), width=2)
        for v in table.loc[table["arm"] == arm, "mae_mean"]:
            draw.ellipse([cx + 38, y(v) - 3, cx + 44, y(v) + 3], fill=c)
        draw.text((cx - 60, h - 32), f"{arm}  {stats['mean']:.4g}", fill=(0, 0, 0))
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
