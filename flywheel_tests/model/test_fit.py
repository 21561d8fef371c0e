"""Model/data fit: real clips round-tripped through a real preset's VAE. tiny-pusht renders PushT well and a
real Unitree G1 camera as a sketch; the measurement says so, names the clips it used, and leaves the
padding bars out."""

import numpy as np
import pandas as pd
import pytest
import torch

from flywheel.data.clips import ClipConfig, prepare_clips
from flywheel.data.ingest import IngestConfig, ingest
from flywheel.errors import DataError
from flywheel.model.encode import codec_roundtrips
from flywheel.model.fit import (DEFAULT_MIN_PSNR_DB, DEFAULT_MIN_SSIM, clip_set_fit, manifest_fit, measure_fit,
                                spread_over_episodes)
from flywheel.model.presets import get_preset, load_pipeline
from flywheel.quality.stats import psnr
from flywheel_tests.data.test_clips import g1_manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_pusht():
    return load_pipeline("tiny-pusht")


@pytest.fixture(scope="module")
def manifests(robot_datasets, tmp_path_factory):
    """PushT through ingest; G1 as a manifest of three episodes' first 2 s (ingest hashes all 12 videos)."""
    from flywheel.store import ArtifactStore

    store = ArtifactStore(tmp_path_factory.mktemp("fit") / "home")
    pusht = ingest(IngestConfig(source=str(robot_datasets / "pusht_rotated")), store)
    g1 = g1_manifest(robot_datasets / "g1_pick_bottle", {0: (2.0, "train"), 5: (2.0, "train"), 11: (2.0, "val")})
    return {"pusht_rotated": (pusht.frame, pusht.key), "g1_pick_bottle": (g1, "g1-manifest")}, store


def test_tiny_pusht_fits_pusht_and_not_the_real_g1_camera(tiny_pusht, manifests):
    found, _ = manifests
    pusht = manifest_fit(tiny_pusht, found["pusht_rotated"][0], max_clips=2, source="pusht_rotated")
    g1 = manifest_fit(tiny_pusht, found["g1_pick_bottle"][0], max_clips=2, source="g1_pick_bottle")
    assert pusht.preset == g1.preset == "tiny-pusht" and pusht.clip_shape == [17, 64, 64]
    # benchmarks/results/model-fit.md: about 24.6 dB / 0.88 and 5.9 dB / 0.00 on 4 clips
    assert pusht.psnr_db > DEFAULT_MIN_PSNR_DB + 2 and pusht.ssim > DEFAULT_MIN_SSIM + 0.2, pusht
    assert g1.psnr_db < DEFAULT_MIN_PSNR_DB - 10 and g1.ssim < DEFAULT_MIN_SSIM - 0.3, g1
    # two clips from two episodes spread over the dataset, named
    assert [c.episode_id for c in g1.clips] == ["g1_pick_bottle/000000", "g1_pick_bottle/000011"]
    assert g1.clips[0].clip_id == "g1_pick_bottle-000000-f00000"
    assert g1.psnr_db == pytest.approx(np.mean([c.psnr_db for c in g1.clips]))
    meta = g1.metadata()
    assert meta["fit_psnr_db"] == round(g1.psnr_db, 3) and meta["fit_clips"] == 2
    assert g1.as_dict()["psnr_db_min"] == min(c.psnr_db for c in g1.clips)


def test_clip_set_fit_measures_inside_the_picture_not_the_bars(tiny_pusht, manifests):
    found, store = manifests
    frame, key = found["g1_pick_bottle"]
    clip_set = prepare_clips(frame.iloc[:2], key, store, ClipConfig(max_clips_per_episode=1), get_preset("tiny-pusht"))
    fit = clip_set_fit(tiny_pusht, clip_set, max_clips=2)
    assert [c.clip_id for c in fit.clips] == clip_set.frame["clip_id"].tolist() and fit.source == str(clip_set.path)
    from flywheel.data.video import read_frames

    clips = [read_frames(clip_set.path / v) for v in clip_set.frame["video"]]
    # The 8-pixel bars are not data: tiny-pusht paints its PushT floor into them, which the whole frame counts.
    whole = measure_fit(tiny_pusht, clips, ["a", "b"])
    assert abs(whole.psnr_db - fit.psnr_db) > 1
    inside = [psnr(back[:, 8:56], real[:, 8:56]) for real, back in zip(clips, codec_roundtrips(tiny_pusht, clips))]
    assert fit.psnr_db == pytest.approx(np.mean(inside), abs=1e-6)


def test_random_weights_fit_nothing_and_bad_input_is_named(tiny_pipe, manifests):
    found, _ = manifests
    fit = manifest_fit(tiny_pipe, found["pusht_rotated"][0], max_clips=1)
    assert fit.preset == "tiny" and fit.psnr_db < DEFAULT_MIN_PSNR_DB and fit.ssim < DEFAULT_MIN_SSIM
    with pytest.raises(DataError, match="cell-a: no clips"):
        measure_fit(tiny_pipe, [], [], source="cell-a")


def test_clips_are_spread_over_episodes_first():
    table = pd.DataFrame({"episode_id": ["a", "a", "b", "c", "c", "d"], "clip": range(6)})
    assert spread_over_episodes(table, 2)["clip"].tolist() == [0, 5]
    assert spread_over_episodes(table, 4)["clip"].tolist() == [0, 2, 3, 5]
    assert spread_over_episodes(table, 6)["clip"].tolist() == list(range(6))
    assert spread_over_episodes(table, 5)["clip"].tolist() in ([0, 1, 2, 3, 5], [0, 2, 3, 4, 5])
