"""Curation end to end on the embedded domain (rotated-camera PushT): a pseudo_actions artifact of real and
corrupted clips, shaped like generated ones, is judged by `curate`: the real ones kept, the corrupted ones
rejected with the check, its value and its threshold, the simulator replay and progress recorded for every
candidate; and the codec fitness rule of `calibrate_on: model_codec`, with the real tiny-pusht VAE."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flywheel.data.video import write_video
from flywheel.label import load_episodes
from flywheel.label.config import IdmConfig
from flywheel.label.idm import train_idm
from flywheel.label.labeling import label_video, nearest_indices
from flywheel.quality import FILTER_VERSION, FilterConfig, Thresholds, real_clips
from flywheel.quality.corruptions import corrupt_family
from flywheel.quality.curation import calibration_clips, curate

ROOT_NAME = "pusht_rotated"
FPS, FRAMES = 16.0, 17


@pytest.fixture(scope="module")
def domain(robot_datasets, episode_cache, tmp_path_factory):
    root = robot_datasets / ROOT_NAME
    work = tmp_path_factory.mktemp("curation")
    idm_dir = work / "idm"
    train_idm(root, IdmConfig(steps=200, batch_size=8, episodes=[0, 1, 2, 3], val_episodes=[3]), idm_dir,
              cache_dir=episode_cache)
    return root, work, idm_dir


def _pseudo_actions(root, work, idm_dir, episode_cache):
    """A synthetic set + labels artifact (the layout the generate and label stages write) of clips of
    held-out episode 8: as generated from the clip's first frame (frame 0 = the conditioning frame)."""
    from flywheel.label.idm import InverseDynamicsModel

    idm = InverseDynamicsModel.load(idm_dir)
    episode = load_episodes(root, [8], image_size=64, cache_dir=episode_cache)[0]
    idx = nearest_indices(len(episode), episode.fps, FPS)
    synthetic, labels = work / "synthetic", work / "labels"
    for d in (synthetic / "videos", synthetic / "first_frames", labels / "actions"):
        d.mkdir(parents=True)
    samples, rows = [], []
    starts = [17, 49, 81]  # windows real_clips cuts too (1 s apart from frame 1)
    clean = [dict(start=s, frames=episode.frames[idx[s:s + FRAMES]], kind="good") for s in starts]
    rng = np.random.default_rng(0)
    bad = [("freeze", "strong"), ("appear", "strong"), ("cut", "strong")]
    clips = real_clips([episode], FRAMES, FPS)
    for spec, c in zip(bad, clean):
        clip = next(x for x in clips if x.meta["frame_indices"][1] == idx[c["start"]])
        corrupted = corrupt_family(clip, *spec, rng, donor=clips[0] if spec[0] != "cut" else clips[-1])
        clean.append(dict(start=c["start"], frames=np.asarray(corrupted.frames), kind=spec[0]))
    for i, c in enumerate(clean):
        rid = f"{ROOT_NAME}-000008-f{c['start']:05d}-{c['kind']}-{i}"
        write_video(synthetic / "videos" / f"{rid}.mp4", c["frames"], fps=int(FPS))
        Image.fromarray(episode.frames[idx[c["start"]]]).save(synthetic / "first_frames" / f"{rid}.png")
        actions, disagreement = label_video(idm, c["frames"], FPS)
        np.savez(labels / "actions" / f"{rid}.npz", actions=actions, disagreement=disagreement)
        samples.append(dict(request_id=rid, video=f"videos/{rid}.mp4", first_frame=f"first_frames/{rid}.png",
                            fps=FPS, prompt=f"prompt-{i}", source_episode_id=f"{ROOT_NAME}/000008",
                            source_clip_id=f"{ROOT_NAME}-000008-f{c['start']:05d}"))
        rows.append(dict(request_id=rid, actions=f"actions/{rid}.npz", num_frames=FRAMES, fps=FPS,
                         mean_disagreement=float(disagreement.mean())))
    pd.DataFrame(samples).to_parquet(synthetic / "samples.parquet", index=False)
    pd.DataFrame(rows).to_parquet(labels / "labels.parquet", index=False)
    (labels / "labels.json").write_text(json.dumps({"synthetic": str(synthetic), "idm": str(idm_dir)}))
    return labels


def test_curate_keeps_real_rejects_corrupted_and_records_the_simulator(domain, episode_cache, tmp_path):
    root, work, idm_dir = domain
    labels = _pseudo_actions(root, work, idm_dir, episode_cache)
    out = tmp_path / "curated"
    out.mkdir()
    meta = curate(out, labels, root, calibration_episodes=[4, 5, 6, 7], train_episodes=[0, 1, 2, 3],
                  config=FilterConfig())
    for name in ("results.parquet", "thresholds.json", "curated.json", "scores.png", "accepted.png"):
        assert (out / name).is_file(), name
    results = pd.read_parquet(out / "results.parquet").set_index("clip_id")
    kinds = results.index.str.split("-").str[-2]
    assert results.loc[kinds == "good", "accepted"].all(), results.loc[kinds == "good", "reasons"].tolist()
    assert not results.loc[kinds != "good", "accepted"].any()
    # Every rejection names the check, the measured value and the threshold.
    for reasons in results.loc[~results["accepted"], "reasons"]:
        assert all(" < " in r or " > " in r for r in reasons.split("; ")), reasons
    assert results.loc[kinds == "freeze", "reasons"].str.contains("static: frozen_tail").all()
    # The simulator replay and its progress are recorded for every candidate; the replay is calibrated, the
    # progress gates only where the user asks for it (quality.min_progress; below).
    for stat in ("replay_agent_error", "replay_block_error", "replay_block_overlap", "sim_progress"):
        assert results[stat].notna().all(), stat
    thresholds = Thresholds.load(out / "thresholds.json")
    assert thresholds.filter_version == FILTER_VERSION and thresholds.directions["replay_block_overlap"] == "min"
    assert "sim_progress" not in thresholds.values and not results["reasons"].str.contains("sim_progress").any()
    assert thresholds.action_reference["episodes"] == [0, 1, 2, 3]
    # The training episodes' clips calibrate the video statistics too, and the thresholds say which.
    assert thresholds.source["video_episodes"] == [0, 1, 2, 3] and thresholds.source["video_clips"] > 0
    assert thresholds.num_real_clips > thresholds.source["video_clips"]
    assert meta["accepted"] == 3 and meta["clips"] == 6 and meta["calibrated_on"] == "real"
    assert "sim_progress_accepted_mean" in meta
    # The calibration's own estimate of its false rejection on episodes it has not seen, and what it did.
    assert 0 <= meta["held_out_false_rejection"] == round(thresholds.held_out_false_rejection, 4) <= 1
    assert "held out: the stack calibrated without each episode rejects" in meta["calibration_notes"]
    # The progress filter is configurable: asking for more progress than a 1 s clip makes rejects on it.
    (tmp_path / "strict").mkdir()
    strict = curate(tmp_path / "strict", labels, root, [4, 5, 6, 7], [0, 1, 2, 3], FilterConfig(min_progress=0.5))
    assert strict["accepted"] == 0
    strict_results = pd.read_parquet(tmp_path / "strict" / "results.parquet")
    assert strict_results["reasons"].str.contains("verifier: sim_progress=").all()


def test_model_codec_calibration_falls_back_when_the_codec_cannot_render_the_domain(robot_datasets, episode_cache):
    """tiny-pusht's VAE renders PushT (about 25 dB): calibrate on its renders, references included; it cannot
    render the G1 humanoid (about 6 dB): every check would be blind, so the raw clips are used and the
    thresholds say why."""
    from flywheel.model.encode import codec_roundtrips
    from flywheel.model.presets import load_pipeline

    pipe = load_pipeline("tiny-pusht", vae_only=True)
    codec = lambda clips: codec_roundtrips(pipe, clips)  # noqa: E731
    config = FilterConfig(calibrate_on="model_codec")
    cond = np.zeros((64, 64, 3), np.uint8)
    for name, fit in ((ROOT_NAME, True), ("g1_pick_bottle", False)):
        episode = load_episodes(robot_datasets / name, [5], image_size=64, cache_dir=episode_cache)[0]
        clips = real_clips([episode], FRAMES, FPS, max_clips_per_episode=3)
        judged, references, info = calibration_clips(clips, config, codec, extra=[cond])
        assert (info["calibrated_on"] == "model_codec") is fit, info
        if fit:
            assert info["codec_psnr"] > config.min_codec_psnr and not info["notes"]
            assert all(c.reference is not None and c.reference.shape == np.shape(c.frames) for c in judged)
            assert not np.array_equal(judged[0].frames, clips[0].frames) and references[0].shape == (FRAMES, 64, 64, 3)
        else:
            assert info["codec_psnr"] < config.min_codec_psnr and "cannot render the domain" in info["notes"][0]
            assert judged is clips and references == [None]
