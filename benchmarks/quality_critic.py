"""Would a learned critic make the quality stack better? Measured leave-one-family-out, as the issue asks: a
critic is used only if it raises held-out-family recall at the same clean false-rejection rate.

    .venv/bin/python benchmarks/quality_critic.py [--datasets g1,pusht_rotated] [--work DIR] [--out benchmarks/results]

The corpus, folds and scores are those of benchmarks/quality_generalization.py (the same cache in --work; run
that first or let this build it). Per dataset and fold, thresholds are calibrated on the other fold's clean
clips as there; then, for each held-out family, a critic is trained on the calibration fold's clean clips and
their corruptions of every *other* family, and judged on the test fold's clean clips and that family:

- the critic: scikit-learn's LogisticRegression over every statistic the stack computes, each expressed in
  the calibration clips' own units ((value - median) / (p99 - median), signed so that larger is worse), with
  classes balanced;
- its threshold: held out, as the stack's thresholds are: per calibration episode, a critic trained without
  that episode scores its clean clips; the threshold is the largest of those scores (a stricter one would
  reject clean clips of episodes it has not seen);
- a clip is rejected by "stack + critic" when the stack or the critic rejects it.

Both, the stack alone and the stack with the critic, are measured with the stack's thresholds widened step by
step (`slack`): a curve of (clean false rejection, mean held-out-family recall) each. The critic helps only if,
at the same false rejection, its curve reaches a higher recall.
Writes <out>/quality-critic.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import quality_generalization as qg  # noqa: E402

from flywheel.quality.calibration import thresholds_from_scores  # noqa: E402
from flywheel.quality.config import FilterConfig  # noqa: E402
from flywheel.quality.filters import judge  # noqa: E402

SLACKS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
TARGET_FALSE_REJECTION = 0.03  # the bound on clean clips
UNSCORED = ("idle", "duplicate_distance")  # a flag, and a distance between clips of a group, not of one clip


def scored(name: str, work: Path, codec, config: FilterConfig) -> tuple[dict, pd.DataFrame, dict, dict]:
    """The generalization benchmark's corpus, candidate scores (no-op corruptions left out), action reference
    and stat directions."""
    from flywheel.label.episodes import load_actions
    from flywheel.quality.calibration import real_action_clip_quantiles
    from flywheel.quality.stats import STAT_DIRECTION
    from flywheel.quality.verifier import AT_LEAST

    corpus = qg.build_corpus(name, work, codec, config)
    clips = qg.candidates_for(corpus, "post", work, codec)
    candidates, _, _ = qg.score_corpus(corpus, clips, config, work, codec)
    candidates = candidates[~candidates["clip_id"].isin(qg.no_op_corruptions(clips))].reset_index(drop=True)
    train_actions = load_actions(Path(corpus["root"]), corpus["train"])
    reference = qg._action_reference(train_actions)
    reference["real_clip_quantile"] = real_action_clip_quantiles(
        [e.actions for e in train_actions], train_actions[0].fps, qg.NUM_FRAMES, qg.FPS, reference,
        config.percentile_hi)
    verifier = corpus["verifier_directions"] or {}
    directions = {**STAT_DIRECTION, **{k: "min" if k in AT_LEAST else "max" for k in verifier}, **verifier}
    return corpus, candidates, reference, directions


def features(scores: pd.DataFrame, thresholds, stats: list[str]) -> np.ndarray:
    """Each statistic in the calibration clips' units: 0 at their median, 1 at their p99 (p1 for 'at least')."""
    cols = []
    for stat in stats:
        q, direction = thresholds.real_quantiles[stat], thresholds.directions[stat]
        span = max(q["p_hi"] - q["p50"] if direction == "max" else q["p50"] - q["p_lo"], 1e-6)
        x = scores[stat].to_numpy(dtype=float)
        z = (x - q["p50"]) / span if direction == "max" else (q["p50"] - x) / span
        cols.append(np.clip(np.nan_to_num(z, nan=0.0), -5.0, 20.0))
    return np.stack(cols, axis=1)


def fit_critic(scores: pd.DataFrame, thresholds, stats: list[str]):
    from sklearn.linear_model import LogisticRegression

    y = (scores["kind"] != "good").to_numpy()
    return LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(features(scores, thresholds, stats), y)


def held_out_threshold(train: pd.DataFrame, clean: pd.DataFrame, thresholds, stats: list[str]) -> float:
    """The largest critic score of a clean calibration clip, each scored by a critic trained without its episode."""
    held = []
    for episode in sorted(clean["episode"].unique()):
        critic = fit_critic(train[train["episode"] != episode], thresholds, stats)
        held.append(critic.predict_proba(features(clean[clean["episode"] == episode], thresholds, stats))[:, 1])
    return float(np.concatenate(held).max())


def evaluate(corpus: dict, candidates: pd.DataFrame, reference: dict, directions: dict, config: FilterConfig,
             critic: bool) -> dict:
    """Clean false rejection and per-family recall (both strengths pooled) of the stack, with or without the
    critic, over both folds."""
    clean_rejected, family_rejected = [], {f: [] for f in qg.FAMILIES}
    for test_eps in corpus["folds"]:
        cal_eps = [e for f in corpus["folds"] for e in f if e not in test_eps]
        cal = candidates[candidates["episode"].isin(cal_eps)]
        cal_clean = cal[cal["kind"] == "good"]
        thresholds = thresholds_from_scores(cal_clean, [str(e) for e in cal_clean["episode"]], config, directions,
                                            action_reference=reference)
        test = candidates[candidates["episode"].isin(test_eps)].reset_index(drop=True)
        stack_rejects = ~judge(test, thresholds, config)["accepted"].to_numpy()
        is_clean = (test["kind"] == "good").to_numpy()
        if not critic:
            clean_rejected.append(stack_rejects[is_clean])
            for family in qg.FAMILIES:
                family_rejected[family].append(stack_rejects[test["kind"].str.startswith(family + "/").to_numpy()])
            continue
        stats = [s for s in thresholds.values if s in candidates and s not in UNSCORED]
        for family in qg.FAMILIES:
            train = cal[~cal["kind"].str.startswith(family + "/")]
            limit = held_out_threshold(train, cal_clean, thresholds, stats)
            score = fit_critic(train, thresholds, stats).predict_proba(features(test, thresholds, stats))[:, 1]
            rejects = stack_rejects | (score > limit)
            # the clean clips are judged by every family's critic: their rejection is averaged over them
            clean_rejected.append(rejects[is_clean])
            family_rejected[family].append(rejects[test["kind"].str.startswith(family + "/").to_numpy()])
    recall = {f: float(np.concatenate(r).mean()) for f, r in family_rejected.items()}
    return {"false_rejection": float(np.concatenate(clean_rejected).mean()), "mean_recall": float(np.mean(list(recall.values()))),
            "recall": recall}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="g1,pusht_rotated")
    parser.add_argument("--work", default="/tmp/flywheel-quality-bench")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = qg.default_filter_config()
    codec = qg.CachedCodec("tiny-pusht")
    report = {"command": "python benchmarks/quality_critic.py " + " ".join(argv or sys.argv[1:]),
              "environment": qg.environment(), "target_false_rejection": TARGET_FALSE_REJECTION, "datasets": {}}
    for name in args.datasets.split(","):
        started = time.time()
        corpus, candidates, reference, directions = scored(name, work, codec, config)
        curve = []
        for slack in SLACKS:
            wide = config.model_copy(update={"slack": slack, "max_slack": max(config.max_slack, slack)})
            for critic in (False, True):
                point = evaluate(corpus, candidates, reference, directions, wide, critic)
                curve.append({"slack": slack, "critic": critic, **point})
                qg.log(name, f"slack {slack} critic {critic}: false rejection {point['false_rejection']:.3f}, "
                       f"mean recall {point['mean_recall']:.3f}")
        default_fr = next(p for p in curve if p["slack"] == config.slack and not p["critic"])["false_rejection"]
        report["datasets"][name] = {
            "curve": curve, "seconds": time.time() - started,
            "best_at_default_false_rejection": {k: best(curve, default_fr, k) for k in ("stack", "stack_and_critic")},
            "best_at_target": {k: best(curve, TARGET_FALSE_REJECTION, k) for k in ("stack", "stack_and_critic")}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality-critic.json").write_text(json.dumps(report, indent=2, default=float))
    (out / "quality-critic.md").write_text(markdown(report))
    print(markdown(report))
    return report


def best(curve: list[dict], max_false_rejection: float, kind: str) -> dict | None:
    """The point of highest mean recall whose clean false rejection is at most the given one."""
    points = [p for p in curve if p["critic"] == (kind == "stack_and_critic")
              and p["false_rejection"] <= max_false_rejection + 1e-9]
    return max(points, key=lambda p: p["mean_recall"], default=None)


def markdown(report: dict) -> str:
    env = report["environment"]
    point = lambda p: "none" if p is None else (f"{p['mean_recall']:.1%} (slack {p['slack']}, false rejection "  # noqa: E731
                                                f"{p['false_rejection']:.1%})")
    lines = [f"# Quality stack: would a learned critic help? ({env.get('date', '')})", "",
             f"`{report['command']}` — {env.get('machine', '')}, {env.get('cpus', '')} CPUs, commit {env.get('commit', '')}. "
             "Leave-one-family-out on the held-out folds of benchmarks/quality_generalization.py; the critic is a "
             "logistic regression over the stack's statistics with a held-out threshold (the script's docstring). "
             "Each configuration's thresholds are widened by `slack` (the default is 0.5); a point is (clean false "
             "rejection, mean held-out-family recall).", "",
             "| dataset | best mean recall, stack alone, at the default's false rejection | with the critic | "
             f"stack alone at <= {report['target_false_rejection']:.0%} false rejection | with the critic |",
             "|---|---|---|---|---|"]
    for name, d in report["datasets"].items():
        at_default, at_target = d["best_at_default_false_rejection"], d["best_at_target"]
        lines.append(f"| {name} | {point(at_default['stack'])} | {point(at_default['stack_and_critic'])} | "
                     f"{point(at_target['stack'])} | {point(at_target['stack_and_critic'])} |")
    lines += ["", "Every point (slack: stack alone / stack + critic, as false rejection / mean recall):", ""]
    for name, d in report["datasets"].items():
        pairs = {}
        for p in d["curve"]:
            pairs.setdefault(p["slack"], {})[p["critic"]] = f"{p['false_rejection']:.1%} / {p['mean_recall']:.1%}"
        lines.append(f"- {name}: " + "; ".join(f"{s}: {v[False]} | {v[True]}" for s, v in pairs.items()))
    lines += ["", "The stack keeps no critic unless it raises the best recall at the same false rejection on both "
              "datasets.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
