"""Is the synthetic data useful? Train the same model with the same budget on real-only and on
real + accepted synthetic episodes, once per seed, and compare the error on held-out *real* episodes.

The model is the IDM (flywheel.label): its held-out real action error is the number compared. Both arms
use the same real training episodes, the same held-out real episodes (the manifest's val + test
episodes, passed in by the caller), the same seeds and the same number of gradient steps; only the
synthetic episodes differ (all of the version's, earlier iterations' included: what training on this
version adds to the real data). A seed gives both arms the same initial weights and random stream, so the
comparison is paired: per seed d = error(real + synthetic) - error(real only).

Verdict (`VERDICT_RULE`), from the paired differences' two-sided 95% Student t interval [lo, hi]
(scipy.stats) and a non-inferiority margin m = `margin` x mean real-only error:
    better        hi < 0              the synthetic episodes lower the held-out error
    worse         lo > 0              they raise it (even by less than the margin: measurably harmful)
    non-inferior  lo <= 0, hi < m     not measurably worse, and worse by less than the margin at most
    inconclusive  otherwise           the interval reaches past the margin: the seeds cannot tell
With one seed there is no interval and the verdict is inconclusive. Only `better` and `non-inferior`
pass the gate: a comparison the seeds cannot decide is not a pass, and neither is a consistent small
harm that a point estimate would call "within tolerance".
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import stats

from flywheel.errors import DataError
from flywheel.label.episodes import load_episodes
from flywheel.label.idm import evaluate_idm, fit_idm, split_episodes
from flywheel.refresh.config import UsefulnessConfig
from flywheel.refresh.provenance import read_provenance
from flywheel.store import atomic_write_bytes

VERDICTS = ("better", "non-inferior", "worse", "inconclusive")
PASSING_VERDICTS = ("better", "non-inferior")
CONFIDENCE = 0.95
VERDICT_RULE = ("paired over seeds: d = held-out real error (real+synthetic) - (real only); [lo, hi] = 95% t "
                "interval of mean d; m = margin x mean real-only error. better: hi < 0; worse: lo > 0; "
                "non-inferior: lo <= 0 and hi < m; inconclusive: otherwise or one seed. "
                "Passes only on better or non-inferior.")


@dataclass
class UsefulnessResult:
    table: pd.DataFrame        # one row per (arm, seed)
    summary: dict              # per arm mean and 95% interval, paired difference and its interval, verdict
    verdict: str
    gate_passed: bool
    table_path: Path
    summary_path: Path
    plot_path: Path


def interval95(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of the 95% Student t interval of the mean; one value, or values that are all
    equal, have none (low = high = mean)."""
    x = np.asarray(x, dtype=float)
    m = float(x.mean())
    sem = float(stats.sem(x)) if len(x) > 1 else 0.0
    if not sem > 0:
        return m, m, m
    lo, hi = stats.t.interval(CONFIDENCE, df=len(x) - 1, loc=m, scale=sem)
    return m, float(lo), float(hi)


def verdict_of(low: float, high: float, margin_abs: float, seeds: int) -> str:
    """The rule in the module docstring, on the paired difference's interval [low, high]."""
    if seeds < 2:
        return "inconclusive"
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    if high < margin_abs:
        return "non-inferior"
    return "inconclusive"


def split_real_synthetic(root: str | Path) -> tuple[list[int], list[int]]:
    """(real, synthetic) episode indices of a refreshed dataset, from its provenance file."""
    prov = read_provenance(root)
    if prov is None:
        raise DataError(f"{root}: no provenance.parquet; pass a dataset written by refresh_dataset")
    real = prov.loc[~prov["is_synthetic"], "episode_index"].astype(int).tolist()
    synth = prov.loc[prov["is_synthetic"], "episode_index"].astype(int).tolist()
    return real, synth


def held_out_split(real_ids: list[int], held_out: list[int] | None, config: UsefulnessConfig,
                   root: str | Path) -> tuple[list[int], list[int], str]:
    """(real train, held-out, where the held-out set came from). `held_out` must be real episodes of the
    refreshed dataset (the ingest manifest's val + test: real episodes keep their indices)."""
    if held_out is None:
        idm = config.idm.model_copy(update={"episodes": config.idm.episodes or real_ids})
        train, val = split_episodes(real_ids, idm)
        return train, val, f"the last {config.idm.val_fraction:.0%} of real episodes (no held-out episodes given)"
    unknown = sorted(set(held_out) - set(real_ids))
    if unknown:
        raise DataError(f"{root}: held-out episodes {unknown} are not real episodes of this dataset (real: "
                        f"{real_ids[0]}..{real_ids[-1]}); pass the manifest's val/test episode indices")
    train = [e for e in real_ids if e not in set(held_out)]
    if not held_out or not train:
        raise DataError(f"{root}: held-out episodes {sorted(held_out)} leave {len(train)} real training episodes; "
                        "the comparison needs both (ingest with val/test fractions that keep some of each)")
    return train, sorted(held_out), "the manifest's held-out (val + test) real episodes"


def usefulness_report(refreshed_root: str | Path, config: UsefulnessConfig, out_dir: str | Path,
                      progress: Callable[[dict], None] | None = None,
                      cache_dir: str | Path | None = None,
                      held_out: list[int] | None = None) -> UsefulnessResult:
    """Train real-only and real+synthetic arms on a refreshed dataset, score both on `held_out` real
    episodes (default: the last val_fraction of the real ones); write usefulness.csv/.json/.png."""
    out_dir = Path(out_dir)
    real_ids, synth_ids = split_real_synthetic(refreshed_root)
    if not synth_ids:
        raise DataError(f"{refreshed_root}: no synthetic episodes; nothing to compare")
    train_ids, val_ids, held_out_source = held_out_split(real_ids, held_out, config, refreshed_root)
    idm_cfg = config.idm
    load = dict(image_size=idm_cfg.image_size, camera_key=idm_cfg.camera_key, action_key=idm_cfg.action_key,
                cache_dir=cache_dir)
    real_train = load_episodes(refreshed_root, train_ids, **load)
    val = load_episodes(refreshed_root, val_ids, **load)
    synthetic = load_episodes(refreshed_root, synth_ids, **load)
    arms = {"real_only": real_train, "real_plus_synthetic": real_train + synthetic}
    train_mean = np.concatenate([e.actions for e in real_train]).mean(0)
    rows = []
    for seed in config.seeds:
        for arm, episodes in arms.items():
            model, _ = fit_idm(episodes, idm_cfg.model_copy(update={"seed": seed}), progress=progress or (lambda _: None))
            # Both arms are scored against the same baseline: the real training mean.
            metrics, _ = evaluate_idm(model, val, train_mean)
            rows.append(dict(arm=arm, seed=seed, mae_mean=metrics["mae_mean"],
                             baseline_mae_mean=metrics["baseline_mae_mean"], train_episodes=len(episodes),
                             train_frames=int(sum(len(e) for e in episodes)), steps=idm_cfg.steps))
            if progress is not None:
                progress(dict(stage="usefulness", arm=arm, seed=seed, mae_mean=metrics["mae_mean"]))
    table = pd.DataFrame(rows)
    summary = summarise(table, config.margin)
    summary.update(held_out_episodes=val_ids, held_out_source=held_out_source, train_episodes=train_ids,
                   synthetic_episodes=synth_ids, refreshed_root=str(refreshed_root), config=config.model_dump())
    table_path = atomic_write_bytes(out_dir / "usefulness.csv", table.to_csv(index=False).encode())
    summary_path = atomic_write_bytes(out_dir / "usefulness.json", json.dumps(summary, indent=2).encode())
    plot_path = plot_usefulness(table, summary, out_dir / "usefulness.png")
    return UsefulnessResult(table, summary, summary["verdict"], summary["gate_passed"], table_path, summary_path,
                            plot_path)


def summarise(table: pd.DataFrame, margin: float) -> dict:
    """Per arm mean and interval; the paired difference per seed, its interval (absolute and relative to
    the mean real-only error) and the verdict."""
    arms = {}
    for arm, g in table.groupby("arm"):
        m, lo, hi = interval95(g["mae_mean"].to_numpy())
        arms[arm] = dict(mean=m, ci95=[lo, hi], n=len(g))
    paired = table.pivot(index="seed", columns="arm", values="mae_mean").dropna()
    diff = (paired["real_plus_synthetic"] - paired["real_only"]).to_numpy()
    d, dlo, dhi = interval95(diff)
    real = float(paired["real_only"].mean())
    scale = real if real > 0 else float("nan")
    margin_abs = margin * real
    verdict = verdict_of(dlo, dhi, margin_abs, len(diff))
    return dict(
        verdict=verdict, gate_passed=verdict in PASSING_VERDICTS, rule=VERDICT_RULE, margin=margin,
        margin_abs=margin_abs, seeds=[int(s) for s in paired.index], confidence=CONFIDENCE, arms=arms,
        paired_difference=dict(per_seed=[float(x) for x in diff], mean=d, ci95=[dlo, dhi],
                               relative_mean=d / scale, relative_ci95=[dlo / scale, dhi / scale]),
        relative_change=d / scale)


def plot_usefulness(table: pd.DataFrame, summary: dict, path: str | Path) -> Path:
    """Left: per arm, each seed a dot, the mean a bar, the 95% interval a whisker. Right: the paired
    difference per seed (relative to real-only error), its 95% interval, zero and the margin. Title: verdict."""
    w, h, top, bottom = 720, 330, 58, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    pd_ = summary["paired_difference"]
    lo_r, hi_r = pd_["relative_ci95"]
    draw.text((8, 6), f"usefulness: {summary['verdict'].upper()} ({'passes' if summary['gate_passed'] else 'fails'})"
                      f"   paired change {pd_['relative_mean']:+.1%}, 95% CI [{lo_r:+.1%}, {hi_r:+.1%}], "
                      f"margin +{summary['margin']:.0%}", fill=(0, 0, 0))
    draw.text((8, 22), f"held-out real action MAE, {len(summary['seeds'])} seeds {summary['seeds']}; better: CI < 0;"
                       f" worse: CI > 0; non-inferior: CI straddles 0, below margin", fill=(90, 90, 90))
    draw.text((8, 36), "otherwise inconclusive (not a pass)", fill=(90, 90, 90))
    _plot_arms(draw, table, summary, (50, top, 400, h - bottom))
    _plot_paired(draw, summary, (450, top, w - 10, h - bottom))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _axis(values: list[float], box: tuple[int, int, int, int]):
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or abs(hi) * 0.05 or 1.0
    lo, hi = lo - pad, hi + pad
    return lambda v: box[1] + (hi - v) / (hi - lo) * (box[3] - box[1]), lo, hi


def _plot_arms(draw: ImageDraw.ImageDraw, table: pd.DataFrame, summary: dict, box) -> None:
    values = [*table["mae_mean"], *[v for a in summary["arms"].values() for v in a["ci95"]]]
    y, lo, hi = _axis(values, box)
    left, _, right, bottom = box
    draw.line([(left, box[1]), (left, bottom), (right, bottom)], fill=(120, 120, 120))
    draw.text((4, box[1] - 4), f"{hi:.4g}", fill=(90, 90, 90))
    draw.text((4, bottom - 6), f"{lo:.4g}", fill=(90, 90, 90))
    colours = {"real_only": (40, 90, 220), "real_plus_synthetic": (220, 120, 0)}
    for i, (arm, stats_) in enumerate(summary["arms"].items()):
        cx = left + 80 + i * 170
        c = colours.get(arm, (0, 0, 0))
        draw.rectangle([cx - 30, y(stats_["mean"]), cx + 30, bottom], outline=c, width=2)
        draw.line([(cx, y(stats_["ci95"][0])), (cx, y(stats_["ci95"][1]))], fill=(0, 0, 0), width=2)
        for v in table.loc[table["arm"] == arm, "mae_mean"]:
            draw.ellipse([cx + 38, y(v) - 3, cx + 44, y(v) + 3], fill=c)
        draw.text((cx - 60, bottom + 8), f"{arm}  {stats_['mean']:.4g}", fill=(0, 0, 0))


def _plot_paired(draw: ImageDraw.ImageDraw, summary: dict, box) -> None:
    pd_ = summary["paired_difference"]
    real = summary["arms"]["real_only"]["mean"] or 1.0
    per_seed = [v / real for v in pd_["per_seed"]]
    values = [0.0, summary["margin"], *per_seed, *pd_["relative_ci95"]]
    y, _, _ = _axis(values, box)
    left, _, right, bottom = box
    for level, label, colour in ((0.0, "no change", (120, 120, 120)),
                                 (summary["margin"], f"margin {summary['margin']:+.0%}", (200, 0, 0))):
        draw.line([(left, y(level)), (right, y(level))], fill=colour)
        draw.text((right - 80, y(level) - 12), label, fill=colour)
    cx = (left + right) // 2 - 20
    low, high = pd_["relative_ci95"]
    draw.line([(cx, y(low)), (cx, y(high))], fill=(0, 0, 0), width=3)
    draw.line([(cx - 12, y(pd_["relative_mean"])), (cx + 12, y(pd_["relative_mean"]))], fill=(0, 0, 0), width=3)
    for value in (low, high):
        draw.text((cx - 58, y(value) - 6), f"{value:+.1%}", fill=(0, 0, 0))
    for v in per_seed:
        draw.ellipse([cx + 18, y(v) - 3, cx + 24, y(v) + 3], fill=(220, 120, 0))
    draw.text((left, bottom + 8), "paired change per seed (real+synth - real) / real", fill=(0, 0, 0))
