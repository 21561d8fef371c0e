"""How good are the filters? Known-good real clips and known-bad clips corrupted from them in code,
run through the stack; precision and recall per filter, for the whole stack, and recall per corruption.
Reported with the filter version, so a report always says which filter definitions it measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.quality.calibration import Clip, Thresholds
from flywheel.quality.config import FILTER_VERSION, FilterConfig
from flywheel.quality.corruptions import TARGETS, corrupt
from flywheel.quality.filters import FILTERS, filter_clips

VIDEO_KINDS = ["frozen", "flicker", "blur", "overexposed", "shuffled", "wrong_first_frame", "teleport", "duplicate"]


def _episode_of(clip: Clip) -> str:
    return clip.clip_id.split("-t")[0]


def make_validation_clips(good: list[Clip], kinds: list[str] | None = None, seed: int = 0,
                          idm=None, action_scale: np.ndarray | None = None) -> list[Clip]:
    """The good clips plus one corrupted copy of each per kind. With `idm`, every clip's actions are the
    IDM's labels of its (possibly corrupted) video, as for generated clips; action_spike corrupts those."""
    kinds = list(kinds) if kinds is not None else VIDEO_KINDS + (["action_spike"] if action_scale is not None else [])
    unknown = sorted(set(kinds) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown corruption kinds {unknown}; known: {sorted(TARGETS)}")
    rng = np.random.default_rng(seed)
    clips = list(good)
    for i, clip in enumerate(good):
        # A donor from another episode when there is one: a wrong first frame must really be wrong.
        others = [g for g in good if _episode_of(g) != _episode_of(clip)] or [g for g in good if g is not clip]
        donor = others[(i * 7) % len(others)] if others else None
        for kind in kinds:
            if kind == "action_spike":
                continue
            clips.append(corrupt(clip, kind, rng, donor=donor if kind != "duplicate" else clip))
    if idm is not None:
        from flywheel.label.labeling import label_video

        relabelled = []
        for c in clips:
            actions, disagreement = label_video(idm, np.asarray(c.frames), c.fps)
            relabelled.append(Clip(**{**c.__dict__, "actions": actions, "disagreement": disagreement}))
        clips = relabelled
    if "action_spike" in kinds:
        clips += [corrupt(c, "action_spike", rng, action_scale=action_scale) for c in clips[:len(good)]]
    return clips


def validate_filters(clips: list[Clip], thresholds: Thresholds, config: FilterConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(report, per-clip results). Report rows: scope "filter" (precision over everything it rejects, recall
    on the corruptions it targets), "stack" (all bad vs all good), "kind" (stack recall per corruption)."""
    results = filter_clips(clips, thresholds, config)
    bad = (results["kind"] != "good").to_numpy()
    rows = []
    for name in FILTERS:
        col = f"pass_{name}"
        if col not in results:
            continue
        flagged = ~results[col].to_numpy()
        targets = [k for k, fs in TARGETS.items() if name in fs]
        target = results["kind"].isin(targets).to_numpy()
        rows.append(_row("filter", name, ",".join(targets), flagged, bad, target))
    rejected = ~results["accepted"].to_numpy()
    rows.append(_row("stack", "all", "all", rejected, bad, bad))
    for kind in sorted(set(results["kind"]) - {"good"}):
        is_kind = (results["kind"] == kind).to_numpy()
        rows.append({**_row("kind", kind, ",".join(TARGETS.get(kind, [])), rejected, bad, is_kind),
                     "precision": np.nan})  # precision is a property of a filter, not of a corruption
    good = ~bad
    rows.append(dict(scope="stack", name="good_kept", targets="good", n=int(good.sum()),
                     n_flagged=int((rejected & good).sum()), tp=0, fp=int((rejected & good).sum()),
                     precision=np.nan, recall=float((~rejected[good]).mean()) if good.any() else np.nan))
    report = pd.DataFrame(rows)
    report.insert(0, "filter_version", FILTER_VERSION)
    return report, results


def _row(scope: str, name: str, targets: str, flagged: np.ndarray, bad: np.ndarray, target: np.ndarray) -> dict:
    tp = int((flagged & bad).sum())
    fp = int((flagged & ~bad).sum())
    return dict(scope=scope, name=name, targets=targets, n=int(target.sum()), n_flagged=int(flagged.sum()), tp=tp,
                fp=fp, precision=tp / (tp + fp) if tp + fp else np.nan,
                recall=float(flagged[target].mean()) if target.any() else np.nan)


def save_report(report: pd.DataFrame, out_dir: str | Path) -> Path:
    """report_v<filter version>.csv in out_dir (one file per filter version)."""
    from flywheel.store import atomic_write_bytes

    path = Path(out_dir) / f"filter_validation_v{FILTER_VERSION}.csv"
    return atomic_write_bytes(path, report.to_csv(index=False).encode())
