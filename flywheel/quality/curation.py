"""Curation: the whole filter stack over one set of labelled synthetic trajectories.

1. Calibration clips: windows of the domain's held-out real episodes, shaped like the generated clips, and
   up to `train_clips` windows of its training episodes, which calibrate the video statistics only (the
   IDM was trained on them: its labels of them would make the action thresholds too strict).
   With `calibrate_on: model_codec` they go through the base model's codec (VAE encode + decode) first, as
   every generated frame does, *unless the codec cannot render the domain* (round-trip PSNR below
   `min_codec_psnr`): then every check would be calibrated on the codec's own artefacts and blinded, so the
   raw clips are used and thresholds.json says so.
2. References: each clip's conditioning frame as the codec renders a *still* clip of it. Statistics are
   measured relative to it (sharpness, brightness, colour, the codec's own drift on a scene where nothing
   moves), so the codec's blur and drift are not defects, while what the generator adds still is.
3. Pseudo-actions (the domain's IDM) for the calibration clips, as for the generated ones; the action
   scales come from the episodes the domain trains on.
4. Domains recorded in a simulator (flywheel.simulation; the PushT sample): each clip's pseudo-actions are
   replayed from the clip's start state by the domain's verifier; the replay is compared with the video and
   its task progress recorded.
5. Thresholds from the real clips (calibration.calibrate), then every candidate scored and judged.

The artifact layout: results.parquet (clip_id, accepted, reasons, a float column per statistic),
thresholds.json, curated.json, scores.png, rejected.png, accepted.png.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.quality.calibration import (Clip, Thresholds, calibrate, real_clips, spread,
                                          video_calibration_clips)
from flywheel.quality.config import FilterConfig
from flywheel.image_metrics import psnr

# Frames through the model's codec: a list of uint8 [T, H, W, 3] clips in, the same shapes out.
Codec = Callable[[list[np.ndarray]], list[np.ndarray]]
Progress = Callable[[dict], None] | None


def load_candidates(labels_path: str | Path) -> tuple[pd.DataFrame, Path, Path]:
    """(samples joined with their labels, synthetic dir, idm dir) of a pseudo_actions artifact."""
    labels_path = Path(labels_path)
    links = json.loads((labels_path / "labels.json").read_text())
    synthetic = Path(links["synthetic"])
    table = pd.read_parquet(synthetic / "samples.parquet").merge(
        pd.read_parquet(labels_path / "labels.parquet"), on="request_id", suffixes=("", "_label"))
    return table, synthetic, Path(links["idm"])


def still_clip(frame: np.ndarray, num_frames: int) -> np.ndarray:
    return np.repeat(np.asarray(frame)[None], num_frames, axis=0)


def codec_fidelity(raw: list[np.ndarray], rendered: list[np.ndarray]) -> float:
    """Mean PSNR (dB) of the codec's round trip of real clips: can it render this domain at all?"""
    return float(np.mean([psnr(r, c) for r, c in zip(raw, rendered)]))


def calibration_clips(clips: list[Clip], config: FilterConfig, codec: Codec | None,
                      extra: list[np.ndarray] | None = None) -> tuple[list[Clip], list[np.ndarray | None], dict]:
    """Real clips as they are judged: through the codec with their references (see module doc), or raw.
    `extra`: more conditioning frames (the candidates') whose references are rendered in the same codec
    call. Returns (clips, references of `extra`, {"calibrated_on", "codec_psnr", "notes"})."""
    extra = extra or []
    info: dict = {"calibrated_on": "real", "codec_psnr": None, "notes": []}
    if config.calibrate_on != "model_codec":
        return clips, [None] * len(extra), info
    if codec is None:
        raise ValueError("quality.calibrate_on is 'model_codec' but no codec was given; pass the base model's codec")
    raw = [np.asarray(c.frames) for c in clips]
    rendered = codec(raw)
    info["codec_psnr"] = codec_fidelity(raw, rendered)
    if info["codec_psnr"] < config.min_codec_psnr:
        info["notes"].append(
            f"model_codec: the codec renders this domain's real clips at {info['codec_psnr']:.1f} dB PSNR "
            f"(< min_codec_psnr {config.min_codec_psnr:g}): it cannot render the domain, and thresholds calibrated "
            "on its output would pass anything; calibrated on the raw clips instead")
        return clips, [None] * len(extra), info
    num_frames = len(raw[0])
    references = codec([still_clip(c.first_frame, num_frames) for c in clips] +
                       [still_clip(f, num_frames) for f in extra])
    info["calibrated_on"] = "model_codec"
    coded = [dataclasses.replace(c, frames=f, reference=r) for c, f, r in zip(clips, rendered, references)]
    return coded, references[len(clips):], info


def label_clips(clips: list[Clip], idm) -> list[Clip]:
    from flywheel.label.labeling import label_video

    out = []
    for c in clips:
        actions, disagreement = label_video(idm, np.asarray(c.frames), c.fps)
        out.append(dataclasses.replace(c, actions=actions, disagreement=disagreement))
    return out


def replay_scores(verifier, sources: list[dict | None], clips: list[Clip]) -> list[dict]:
    """The verifier's scores for each clip whose start state is known ({} where it is not)."""
    return [{} if src is None or c.actions is None else verifier.verify(src, np.asarray(c.frames), c.actions, c.fps)
            for src, c in zip(sources, clips)]


def real_clip_start(simulation, root: Path, clip: Clip) -> dict | None:
    """The simulator start of a real clip (its first frame's source frame)."""
    first = 1 + int(clip.meta.get("first_index", 0))
    return simulation.clip_start(root, int(clip.meta["episode_index"]), int(clip.meta["frame_indices"][first]))


def curate(out_dir: str | Path, labels_path: str | Path, dataset_root: str | Path, calibration_episodes: list[int],
           train_episodes: list[int], config: FilterConfig, codec: Codec | None = None,
           progress: Progress = None) -> dict:
    """Calibrate on real episodes, judge every labelled synthetic trajectory of `labels_path`, write the
    artifact files into `out_dir` (see module doc). Returns the stage metadata."""
    from PIL import Image

    from flywheel.data.video import read_frames
    from flywheel.preview import contact_sheet
    from flywheel.label.episodes import dataset_info, load_actions, load_episodes
    from flywheel.label.idm import InverseDynamicsModel
    from flywheel.simulation import generated_clip_start, simulation_for
    from flywheel.quality.browse import write_browse
    from flywheel.quality.filters import filter_clips

    out_dir, root = Path(out_dir), Path(dataset_root)
    table, synthetic, idm_dir = load_candidates(labels_path)
    idm = InverseDynamicsModel.load(idm_dir)
    fps, num_frames = float(table["fps"].iloc[0]), int(table["num_frames"].iloc[0])
    first_frames = [np.asarray(Image.open(synthetic / f).convert("RGB")) for f in table["first_frame"]]
    _report(progress, "calibration clips", 0, 3)
    real = real_clips(load_episodes(root, calibration_episodes, image_size=config.analysis_size), num_frames, fps)
    video_episodes = spread([e for e in train_episodes if e not in calibration_episodes], config.train_clips)
    video_only = video_calibration_clips(load_episodes(root, video_episodes, image_size=config.analysis_size),
                                         num_frames, fps, config.train_clips) if video_episodes else []
    coded, references, info = calibration_clips(real + video_only, config, codec, extra=first_frames)
    real, video_only = coded[:len(real)], coded[len(real):]
    _report(progress, "label calibration clips", 1, 3)
    real = label_clips(real, idm)
    simulation = simulation_for(root)
    verifier = simulation.verifier(root) if simulation is not None else None
    if verifier is not None:
        scores = replay_scores(verifier, [real_clip_start(simulation, root, c) for c in real], real)
        real = [dataclasses.replace(c, extra_stats=s) for c, s in zip(real, scores)]
    thresholds = calibrate(real + video_only, config, load_actions(root, train_episodes),
                           source={"dataset_root": str(root), "episodes": list(calibration_episodes),
                                   "video_episodes": sorted({int(c.meta["episode_index"]) for c in video_only}),
                                   "video_clips": len(video_only), "calibrate_on": config.calibrate_on},
                           extra_directions=getattr(verifier, "directions", None), **info)
    _report(progress, "judge candidates", 2, 3)
    videos = [read_frames(synthetic / v) for v in table["video"]]
    labels = [np.load(Path(labels_path) / a) for a in table["actions"]]
    candidates = [Clip(clip_id=row.request_id, frames=video, first_frame=first, fps=fps, actions=z["actions"],
                       group=row.prompt, disagreement=z["disagreement"], reference=ref)
                  for row, video, first, z, ref in zip(table.itertuples(), videos, first_frames, labels, references)]
    if verifier is not None:
        dataset_fps = float(dataset_info(root)["fps"])
        sources = [generated_clip_start(simulation, root, dataset_fps, row.source_episode_id, row.source_clip_id, fps)
                   for row in table.itertuples()]
        candidates = [dataclasses.replace(c, extra_stats=s)
                      for c, s in zip(candidates, replay_scores(verifier, sources, candidates))]
    results = filter_clips(candidates, thresholds, config)
    frames = {c.clip_id: np.asarray(c.frames) for c in candidates}
    thresholds.save(out_dir / "thresholds.json")
    write_browse(results, out_dir, thresholds, frames=frames)
    accepted = results[results["accepted"]]
    if len(accepted):
        contact_sheet([frames[c] for c in accepted["clip_id"][:24]], list(accepted["clip_id"][:24]),
                      out_dir / "accepted.png")
    (out_dir / "curated.json").write_text(json.dumps({"labels": str(labels_path), "synthetic": str(synthetic)}))
    _report(progress, "done", 3, 3)
    return curation_summary(results, thresholds)


def curation_summary(results: pd.DataFrame, thresholds: Thresholds) -> dict:
    """Stage metadata: counts, which filters rejected how many, how the thresholds were calibrated, and the
    simulator's progress signal of the accepted and the rejected trajectories."""
    reasons = [r.split(":")[0] for rs in results["reasons"] for r in rs.split("; ") if r]
    meta = {"clips": len(results), "accepted": int(results["accepted"].sum()),
            "pass_rate": float(results["accepted"].mean()), "filter_version": str(thresholds.filter_version),
            "rejected_by": json.dumps({r: reasons.count(r) for r in sorted(set(reasons))}),
            "calibrated_on_real_clips": thresholds.num_real_clips, "calibrated_on": thresholds.calibrated_on}
    if thresholds.codec_psnr is not None:
        meta["codec_psnr_db"] = round(thresholds.codec_psnr, 2)
    if thresholds.held_out_false_rejection is not None:
        meta["held_out_false_rejection"] = round(thresholds.held_out_false_rejection, 4)
    meta["calibration_notes"] = "\n".join(thresholds.notes)
    if "sim_progress" in results:
        for name, rows in (("accepted", results[results["accepted"]]), ("rejected", results[~results["accepted"]])):
            values = rows["sim_progress"].dropna()
            meta[f"sim_progress_{name}_mean"] = float(values.mean()) if len(values) else None
    return meta


def _report(progress: Progress, step: str, done: int, total: int) -> None:
    if progress:
        progress({"stage": "curate", "step": step, "done": done, "total": total})
