"""The IDM learns on real data (well below predict-the-mean) and labels videos of any fps and size."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flywheel.label import IdmConfig, InverseDynamicsModel, label_video, load_episodes, train_idm
from flywheel.label.labeling import nearest_indices

torch.set_num_threads(1)

SMALL = dict(image_size=32, width=16, batch_size=32, lr=3e-3, augment_shift=2)


def test_idm_learns_on_g1_real_robot_data(robot_datasets, episode_cache, tmp_path):
    # Six episodes: with fewer than five to train on, the held-out episode is too unlike the rest.
    config = IdmConfig(episodes=list(range(6)), val_episodes=[5], steps=300, **SMALL)
    result = train_idm(robot_datasets / "g1_pick_bottle", config, tmp_path / "idm", cache_dir=episode_cache,
                       decode_size=64)  # decoded once at 64 px, shared with the filter tests
    m = result.metrics
    assert len(m["mae_per_dim"]) == 26 and "kLeftShoulderPitch" in m["mae_per_dim"]
    assert m["val_episodes"] == [5] and m["train_episodes"] == [0, 1, 2, 3, 4]
    # Held-out real error well below predicting the training mean (measured: 0.65x).
    assert m["mae_mean"] < 0.8 * m["baseline_mae_mean"], m
    assert json.loads(result.metrics_path.read_text())["mae_mean"] == pytest.approx(m["mae_mean"])
    assert Image.open(result.plot_path).size[0] > 400
    reloaded = InverseDynamicsModel.load(result.model_path.parent)
    assert reloaded.fps == 30 and reloaded.camera_key == "observation.images.cam_high"


@pytest.fixture(scope="module")
def pusht_idm(pusht_root, episode_cache, tmp_path_factory):
    config = IdmConfig(val_episodes=[16, 17, 18, 19], steps=250, frame_gap=2, **SMALL)
    return train_idm(pusht_root, config, tmp_path_factory.mktemp("pusht_idm"), cache_dir=episode_cache)


def test_idm_learns_on_pusht_sample(pusht_idm):
    m = pusht_idm.metrics
    assert m["mae_mean"] < 0.6 * m["baseline_mae_mean"], m


def test_label_video_any_fps_and_size(pusht_idm, pusht_root, episode_cache):
    idm = InverseDynamicsModel.load(pusht_idm.model_path)
    ep = load_episodes(pusht_root, [17], image_size=96, cache_dir=episode_cache)[0]
    native, dis = label_video(idm, ep.frames, ep.fps)
    assert native.shape == (len(ep), 2) and dis.shape == (len(ep),) and np.isfinite(dis).all()
    # The same video at 16 fps and 64x64 (what the tiny generator makes): one action per frame, and the
    # labels agree with the native ones at the same instants.
    idx = nearest_indices(len(ep), ep.fps, 16)
    small = np.stack([np.asarray(Image.fromarray(f).resize((64, 64))) for f in ep.frames[idx]])
    fast, fast_dis = label_video(idm, small, 16)
    assert fast.shape == (len(idx), 2) and fast_dis.shape == (len(idx),)
    t_native = np.arange(len(ep)) / ep.fps
    at_same_time = np.stack([np.interp(np.arange(len(idx)) / 16, t_native, native[:, d]) for d in range(2)], 1)
    typical_motion = np.abs(np.diff(ep.actions, axis=0)).mean()
    assert np.abs(fast - at_same_time)[:-4].mean() < 3 * typical_motion
    # Overlapping windows disagree more on a video whose frames were shuffled.
    shuffled = ep.frames[np.random.default_rng(0).permutation(len(ep))]
    assert label_video(idm, shuffled, ep.fps)[1].mean() > dis.mean()


def test_label_video_too_short_says_what_to_do(pusht_idm):
    idm = InverseDynamicsModel.load(pusht_idm.model_path)
    with pytest.raises(ValueError, match="frame_gap"):
        label_video(idm, np.zeros((2, 64, 64, 3), np.uint8), 10)


def test_bad_dataset_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        train_idm(tmp_path, IdmConfig(steps=1), tmp_path / "out")


def test_idm_also_trains_on_its_episodes_as_the_world_models_codec_renders_them(robot_datasets, episode_cache,
                                                                               tmp_path):
    """The IDM labels generated videos, which the world model's VAE decodes: with a codec that renders the
    domain (tiny-pusht's VAE on PushT), it trains on each training episode twice, as recorded and as the codec
    renders it; a codec that cannot render the domain (the same VAE on the G1 humanoid) is measured on one
    episode, refused with its PSNR, and the IDM trains on the real frames only."""
    from flywheel.label.episodes import codec_rendered
    from flywheel.model.encode import codec_roundtrips
    from flywheel.model.presets import load_pipeline

    pipe = load_pipeline("tiny-pusht", vae_only=True)
    calls = []

    def codec(clips):
        calls.append(len(clips))
        return codec_roundtrips(pipe, clips)

    root = robot_datasets / "pusht_rotated"
    episode = load_episodes(root, [0], image_size=64, cache_dir=episode_cache)[0]
    rendered = codec_rendered(episode, codec, 17, 8.0)  # 8 fps: half the codec work of 16, the same path
    assert rendered.frames.shape == episode.frames.shape and rendered.fps == episode.fps
    assert np.array_equal(rendered.actions, episode.actions) and not np.array_equal(rendered.frames, episode.frames)

    config = IdmConfig(episodes=[0, 1, 2], val_episodes=[2], steps=20, image_size=64, width=8, batch_size=8)
    plain = train_idm(root, config, tmp_path / "plain", cache_dir=episode_cache).metrics
    events = []
    through = train_idm(root, config, tmp_path / "codec", cache_dir=episode_cache, codec=codec,
                        codec_clip=(17, 8.0), progress=events.append).metrics
    renderings = [e for e in events if e["stage"] == "codec renderings"]  # shown as it goes, to the end
    assert renderings and renderings[-1]["done"] == renderings[-1]["total"] == 2
    assert plain["codec_augment"] == {"used": False, "reason": "no codec given"}
    assert through["codec_augment"]["used"] and through["codec_augment"]["episodes"] == 2
    assert through["codec_augment"]["psnr"] > config.codec_min_psnr
    assert through["codec_augment"]["val_mae_mean"] > 0  # its error on the held-out episode as the codec renders it
    assert through["train_windows"] == 2 * plain["train_windows"]  # each training episode twice
    off = train_idm(root, config.model_copy(update={"codec_augment": False}), tmp_path / "off",
                    cache_dir=episode_cache, codec=codec).metrics
    assert off["codec_augment"] == {"used": False, "reason": "off"} and off["train_windows"] == plain["train_windows"]

    calls.clear()
    g1 = IdmConfig(episodes=[0, 1, 5], val_episodes=[5], steps=5, image_size=64, width=8, batch_size=8)
    refused = train_idm(robot_datasets / "g1_pick_bottle", g1, tmp_path / "g1", cache_dir=episode_cache,
                        decode_size=64, codec=codec).metrics["codec_augment"]
    assert not refused["used"] and refused["psnr"] < g1.codec_min_psnr, refused
    assert "cannot render this domain" in refused["reason"] and "training episode 0" in refused["reason"]
    assert len(calls) == 1  # one codec call: the first episode's clips; the others were never rendered
