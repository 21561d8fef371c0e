"""Clip preparation on the real G1 video: shapes, resampling, caching, determinism, skipped episodes, previews."""

from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from flywheel.data.clips import (
    CLIP_COLUMNS,
    ClipConfig,
    clip_set_key,
    load_clip_set,
    prepare_clips,
    resample_indices,
    clip_content_box,
    content_box,
    resize_frame,
    resolve_spec,
    restore_frames,
)
from flywheel.data.video import read_frames
from flywheel.errors import ConfigError
from flywheel.preview import LABEL_H, PAD, animated_gif, contact_sheet
from flywheel.model.presets import get_preset
from flywheel.store import ArtifactStore, hash_file, hash_json

CAMERA = "observation.images.cam_high"
TASK = "Pick up the yellow bottle on the table."
TINY = get_preset("tiny")


def g1_manifest(dataset_root: Path, episodes: dict[int, tuple[float, str]], tasks: dict[int, str] | None = None):
    """An episode manifest (the ingest stage's contract) for some G1 episodes, read from LeRobot v3.0 metadata.

    `episodes` maps episode_index -> (seconds to keep from the episode start, split); keeping only a
    short head of each episode keeps decoding fast. `tasks` overrides an episode's task.
    """
    meta = pd.read_parquet(dataset_root / "meta/episodes/chunk-000/file-000.parquet").set_index("episode_index")
    rows = []
    for index, (seconds, split) in episodes.items():
        e = meta.loc[index]
        chunk, file = int(e[f"videos/{CAMERA}/chunk_index"]), int(e[f"videos/{CAMERA}/file_index"])
        start = float(e[f"videos/{CAMERA}/from_timestamp"])
        end = min(float(e[f"videos/{CAMERA}/to_timestamp"]), start + seconds)
        task = (tasks or {}).get(index, str(e["tasks"][0]))
        rows.append(dict(
            episode_id=f"g1_pick_bottle/{index:06d}", episode_index=index, task=task, camera_key=CAMERA, fps=30.0,
            num_frames=round((end - start) * 30), source="lerobot-v3.0", dataset_root=str(dataset_root),
            video_path=str(dataset_root / f"videos/{CAMERA}/chunk-{chunk:03d}/file-{file:03d}.mp4"),
            from_timestamp=start, to_timestamp=end, content_hash=hash_json([index, start, end, task]), split=split,
        ))
    return pd.DataFrame(rows)


# Episode 0: 2.5 s -> 40 frames at 16 fps -> 2 clips of 17; episode 1: 0.5 s -> 8 frames -> skipped;
# episode 8 (second video file): 1.5 s -> 24 frames -> 1 clip.
EPISODES = {0: (2.5, "train"), 1: (0.5, "train"), 8: (1.5, "val")}


@pytest.fixture(scope="module")
def prepared(robot_datasets, tmp_path_factory):
    manifest = g1_manifest(robot_datasets / "g1_pick_bottle", EPISODES)
    store = ArtifactStore(tmp_path_factory.mktemp("clips") / "home")
    return manifest, store, prepare_clips(manifest, "manifest-key", store, ClipConfig(), TINY)


def test_clips_have_the_preset_shape_fps_and_frame_count(prepared):
    _, _, clip_set = prepared
    frame = clip_set.frame
    assert list(frame.columns) == list(CLIP_COLUMNS)
    assert frame["clip_id"].tolist() == ["g1_pick_bottle-000000-f00000", "g1_pick_bottle-000000-f00017",
                                         "g1_pick_bottle-000008-f00000"]
    assert frame["split"].tolist() == ["train", "train", "val"]
    assert set(frame["prompt"]) == {"The robot arm is performing a task. " + TASK}
    for _, clip in frame.iterrows():
        path = clip_set.path / clip["video"]
        assert hash_file(path) == clip["sha256"]
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, float(stream.average_rate)) == ("h264", 16.0)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert np.stack(decoded).shape == (17, 64, 64, 3)
        first = np.asarray(Image.open(clip_set.path / clip["first_frame"]))
        assert first.shape == (64, 64, 3)
        # The PNG is lossless, the mp4 is not: they agree up to compression noise.
        assert np.abs(first.astype(int) - decoded[0].astype(int)).mean() < 8


def test_clip_frames_are_the_nearest_source_frames_resized(prepared):
    manifest, _, clip_set = prepared
    episode = manifest.iloc[0]
    source = read_frames(episode["video_path"], episode["from_timestamp"], episode["to_timestamp"])
    wanted = resample_indices(len(source), 30.0, 16)
    assert wanted[17] == 32  # output frame 17 is at 1.0625 s, nearest source frame 32 (1.0667 s)
    second = clip_set.frame.iloc[1]
    # The first-frame PNG is lossless: exactly the nearest source frame, resized; not its neighbours.
    first = np.asarray(Image.open(clip_set.path / second["first_frame"]))
    assert np.array_equal(first, resize_frame(source[32], 64, 64, "pad"))
    assert not np.array_equal(first, resize_frame(source[31], 64, 64, "pad"))
    assert not np.array_equal(first, resize_frame(source[33], 64, 64, "pad"))
    # The mp4 holds the same frames up to compression noise.
    expected = np.stack([resize_frame(source[i], 64, 64, "pad") for i in wanted[17:34]])
    clip = read_frames(clip_set.path / second["video"])
    assert np.abs(clip.astype(int) - expected.astype(int)).mean() < 5


def test_resample_indices_pick_the_nearest_frame_by_timestamp():
    assert resample_indices(20, 30.0, 16).tolist()[:11] == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19]
    assert resample_indices(16, 16.0, 16).tolist() == list(range(16))
    long = resample_indices(393, 30.0, 16)  # a 13.1 s episode
    assert len(long) == 210 and long[-1] == 392
    assert resample_indices(0, 30.0, 16).size == 0


def test_short_episodes_are_skipped_and_counted(prepared):
    _, _, clip_set = prepared
    summary = load_clip_set(clip_set.path).summary
    assert summary["episodes"] == 3 and summary["episodes_used"] == 2 and summary["episodes_skipped"] == 1
    assert summary["skipped"][0]["episode_id"] == "g1_pick_bottle/000001"
    assert summary["skipped"][0]["frames_at_fps"] == 8
    assert "g1_pick_bottle/000001" not in set(clip_set.frame["episode_id"])
    assert summary["clips"] == 3 and summary["clips_per_split"] == {"train": 2, "val": 1}


def test_preview_is_a_contact_sheet_of_the_clips(prepared):
    _, _, clip_set = prepared
    with Image.open(clip_set.path / "preview.png") as sheet:
        # 3 clips -> 3 rows of 6 frames, 64 px frames shown at 128 px.
        assert sheet.size == (PAD + 6 * (128 + PAD), PAD + 3 * (LABEL_H + 128 + PAD))


def test_preparing_again_returns_the_same_artifact_without_rewriting(prepared):
    manifest, store, clip_set = prepared
    before = (clip_set.path / "clips.parquet").stat().st_mtime_ns
    again = prepare_clips(manifest, "manifest-key", store, ClipConfig(), TINY)
    assert again.reused and again.path == clip_set.path and again.key == clip_set.key
    assert (clip_set.path / "clips.parquet").stat().st_mtime_ns == before
    assert [p.name for p in (store.home / "clips").iterdir()] == [clip_set.key]


def test_preparing_in_another_home_gives_identical_bytes(prepared, tmp_path):
    manifest, _, clip_set = prepared
    other = prepare_clips(manifest, "manifest-key", ArtifactStore(tmp_path / "other"), ClipConfig(), TINY)
    assert other.key == clip_set.key and not other.reused
    assert other.frame["sha256"].tolist() == clip_set.frame["sha256"].tolist()
    for name in clip_set.frame["first_frame"]:
        assert hash_file(other.path / name) == hash_file(clip_set.path / name)


def test_changed_config_makes_a_new_key_and_different_windows(prepared, tmp_path):
    manifest, _, clip_set = prepared
    config = ClipConfig(stride=8, max_clips_per_episode=2)
    assert clip_set_key(manifest, config, resolve_spec(config, TINY)) != clip_set.key
    prefix = ClipConfig(prompt_prefix="")
    assert clip_set_key(manifest, prefix, resolve_spec(prefix, TINY)) != clip_set.key
    # Episode 0 alone: 40 frames, stride 8 -> windows at 0, 8, 16; capped at 2 -> spread: 0 and 16.
    overlapping = prepare_clips(manifest.iloc[:1], "m", ArtifactStore(tmp_path / "home"), config, TINY)
    assert overlapping.frame["start_frame"].tolist() == [0, 16]
    assert overlapping.key != clip_set.key


def test_default_keeps_the_g1_aspect_ratio_with_bars_and_records_it(prepared):
    """480x640 (4:3) in a 64x64 clip: a 48x64 picture between two 8-pixel black bars, recorded per clip and in
    the summary; a generated clip of it maps back to the camera's 480x640 without distortion."""
    manifest, _, clip_set = prepared
    assert ClipConfig().resize == "pad"
    assert clip_set.summary["aspect"]["resize"] == "pad"
    assert clip_set.summary["aspect"]["source_sizes"] == {"480x640": {"content_box": [8, 0, 48, 64], "episodes": 3}}
    for _, clip in clip_set.frame.iterrows():
        assert clip_content_box(clip) == (8, 0, 48, 64)
        first = np.asarray(Image.open(clip_set.path / clip["first_frame"])).astype(int)
        assert first[:8].max() == 0 and first[-8:].max() == 0 and first[8:-8].mean() > 40
    episode = manifest.iloc[0]
    source = read_frames(episode["video_path"], episode["from_timestamp"], episode["to_timestamp"])[:1]
    back = restore_frames(np.stack([resize_frame(source[0], 64, 64, "pad")]), (8, 0, 48, 64), 480, 640)
    # the same as shrinking to 48x64 and growing back: only resolution is lost, not geometry
    low = np.asarray(Image.fromarray(source[0]).resize((64, 48), Image.Resampling.BILINEAR))
    expected = np.asarray(Image.fromarray(low).resize((640, 480), Image.Resampling.BILINEAR))
    assert back.shape == (1, 480, 640, 3) and np.abs(back[0].astype(int) - expected.astype(int)).mean() < 0.5
    stretched_back = restore_frames(np.stack([resize_frame(source[0], 64, 64, "stretch")]), (8, 0, 48, 64), 480, 640)
    assert np.abs(stretched_back[0].astype(int) - expected.astype(int)).mean() > 5


def test_pad_keeps_the_whole_picture_undistorted_and_squares_are_unchanged():
    image = np.zeros((80, 160, 3), np.uint8)
    image[:, :40], image[:, 40:120], image[:, 120:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    assert content_box(80, 160, 32, 32, "pad") == (8, 0, 16, 32)
    padded = resize_frame(image, 32, 32, "pad")
    assert padded.shape == (32, 32, 3) and padded[:8].max() == 0 and padded[-8:].max() == 0
    row = padded[16]
    assert row[2, 0] > 200 and row[16, 1] > 200 and row[-3, 2] > 200  # red, green, blue all still there
    assert np.array_equal(resize_frame(image[:, :80], 32, 32, "pad"), resize_frame(image[:, :80], 32, 32, "stretch"))
    assert content_box(80, 160, 32, 32, "center-crop") == content_box(80, 160, 32, 32, "stretch") == (0, 0, 32, 32)
    with pytest.raises(ValueError, match="clips.resize='squash'"):
        resize_frame(image, 32, 32, "squash")


def test_center_crop_keeps_the_middle_and_stretch_keeps_everything():
    image = np.zeros((8, 16, 3), np.uint8)
    image[:, :4], image[:, 4:12], image[:, 12:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    cropped = resize_frame(image, 4, 4, "center-crop")
    assert cropped.shape == (4, 4, 3) and (cropped[..., 1] > 200).all()
    stretched = resize_frame(image, 4, 4, "stretch")
    assert stretched[0, 0, 0] > 200 and stretched[0, -1, 2] > 200


def test_bad_input_fails_clearly_and_leaves_nothing(prepared, tmp_path, robot_datasets):
    manifest, _, _ = prepared
    store = ArtifactStore(tmp_path / "home")
    with pytest.raises(ValueError, match="missing column.*content_hash"):
        prepare_clips(manifest.drop(columns=["content_hash"]), "m", store, ClipConfig(), TINY)
    too_short = g1_manifest(robot_datasets / "g1_pick_bottle", {1: (0.5, "train")})
    with pytest.raises(ValueError, match="no clips: all 1 episodes are shorter than 17 frames"):
        prepare_clips(too_short, "m", store, ClipConfig(), TINY)
    assert not (store.home / "clips").exists() or not any((store.home / "clips").iterdir())
    missing = manifest.assign(video_path=str(tmp_path / "gone.mp4"))
    with pytest.raises(ValueError, match="gone.mp4: video file not found"):
        prepare_clips(missing, "m", store, ClipConfig(), TINY)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        ClipConfig(frames=17)
    with pytest.raises(ValidationError):
        ClipConfig(stride=0)
    with pytest.raises(ValidationError, match="16 frames: the Cosmos VAE needs 4k\\+1"):
        ClipConfig(num_frames=16)  # refused with the rest of the config, before any stage runs
    with pytest.raises(ValidationError, match="100 pixels: must be a multiple of 16"):
        ClipConfig(width=100)
    with pytest.raises(ConfigError, match="num_frames=16: the Cosmos VAE needs 4k\\+1"):
        resolve_spec(ClipConfig.model_construct(num_frames=16), TINY)
    with pytest.raises(ConfigError, match="width=100: must be a multiple of 16"):
        resolve_spec(ClipConfig.model_construct(width=100), TINY)
    spec = resolve_spec(ClipConfig(fps=8), get_preset("cosmos-predict2.5-2b"))
    assert (spec.fps, spec.height, spec.width, spec.num_frames, spec.stride) == (8, 432, 768, 93, 93)


def test_contact_sheet_and_gif_sizes(tmp_path):
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (10, 32, 48, 3), dtype=np.uint8),
              rng.integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)]
    sheet = contact_sheet(videos, ["a", "b"], tmp_path / "sheet.png", frames_per_video=4, scale=2.0)
    with Image.open(sheet) as image:
        assert image.size == (PAD + 4 * (96 + PAD), PAD + 2 * (LABEL_H + 64 + PAD))
        # The first cell shows frame 0 of video 0, scaled 2x.
        cell = np.asarray(image.convert("RGB"))[PAD + LABEL_H + 20:PAD + LABEL_H + 60, PAD + 10:PAD + 90]
        expected = np.asarray(Image.fromarray(videos[0][0]).resize((96, 64), Image.Resampling.BILINEAR))[20:60, 10:90]
        assert np.abs(cell.astype(int) - expected.astype(int)).mean() < 1
    with pytest.raises(ValueError, match="2 videos"):
        contact_sheet(videos, ["only one"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="video 1 must be a non-empty uint8"):
        contact_sheet([videos[0], videos[1].astype(np.float32)], None, tmp_path / "bad.png")
    gif = animated_gif(videos, tmp_path / "clip.gif", fps=8, scale=1.0)
    with Image.open(gif) as image:
        assert image.n_frames == 10 and image.size == (PAD + 2 * (48 + PAD), 32 + 2 * PAD)
