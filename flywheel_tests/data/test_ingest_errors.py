"""Bad input: a clear IngestError naming the file, and nothing left behind in the flywheel home.

Datasets are linked copies (symlinks to the embedded sample's files) where only the file a test corrupts is a
real copy, so each case costs milliseconds of disk work.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flywheel.data.ingest import IngestConfig, IngestError, ingest
from flywheel.data.video import read_frames, write_video
from flywheel_tests.data.test_ingest import CAMERA, V3, V21, cut_clips, linked_copy, make_raw_folder

VIDEO_000 = f"videos/{CAMERA}/chunk-000/file-000.mp4"
VIDEO_001 = f"videos/{CAMERA}/chunk-000/file-001.mp4"
V21_VIDEO_1 = f"videos/chunk-000/{CAMERA}/episode_000001.mp4"


@pytest.fixture(scope="module")
def clips(robot_datasets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    cut_clips(robot_datasets, folder)
    return folder


def expect_ingest_error(store, config: IngestConfig, file_name: str, *also: str) -> str:
    """Ingest must fail naming `file_name` (and the words in `also`) and leave the home empty."""
    with pytest.raises(IngestError) as caught:
        ingest(config, store, progress=lambda event: None)
    message = str(caught.value)
    assert file_name in message, message
    for word in also:
        assert re.search(word, message, re.IGNORECASE), f"{word!r} not in: {message}"
    leftovers = [p for p in store.home.rglob("*") if p.is_file() or p.name.startswith(".tmp")]
    assert leftovers == [], leftovers
    return message


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------------- LeRobot v3.0


def test_missing_info_json(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3)
    (root / "meta" / "info.json").unlink()
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/info.json", "not found")


def test_missing_video_file(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3)
    (root / VIDEO_001).unlink()
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-001.mp4", "not found")


def test_truncated_video(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(VIDEO_001,))
    video = root / VIDEO_001
    os.truncate(video, video.stat().st_size // 2)
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-001.mp4", "truncated")


def test_garbage_video(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(VIDEO_000,))
    (root / VIDEO_000).write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-000.mp4", "decoded|corrupt")


def test_fps_mismatch_between_video_and_info(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    edit_json(root / "meta" / "info.json", fps=25)
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-000.mp4", "30 fps", "25 fps")


def test_empty_dataset(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    shutil.rmtree(root / "meta" / "episodes")
    edit_json(root / "meta" / "info.json", total_episodes=0, total_frames=0)
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/episodes", "no episodes")


def test_unknown_camera_lists_the_available_ones(robot_datasets, store):
    config = IngestConfig(source=str(robot_datasets / V3), camera_key="observation.images.wrist")
    expect_ingest_error(store, config, "info.json", "observation.images.wrist", CAMERA)


def test_unsupported_version_and_undetectable_folder(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    edit_json(root / "meta" / "info.json", codebase_version="v1.6")
    expect_ingest_error(store, IngestConfig(source=str(root)), "info.json", "v1.6", "not supported")

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a dataset")
    expect_ingest_error(store, IngestConfig(source=str(tmp_path / "notes")), "notes", "cannot tell the format")
    expect_ingest_error(store, IngestConfig(source=str(tmp_path / "nowhere")), "nowhere", "no such folder")


def test_format_that_does_not_match_the_folder(robot_datasets, store):
    config = IngestConfig(source=str(robot_datasets / V3), format="raw-videos")
    expect_ingest_error(store, config, V3, "lerobot-v3.0", "raw-videos")


def test_hub_repo_id_offline_is_a_clear_error(store):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    expect_ingest_error(store, IngestConfig(source="flywheel-test/does-not-exist"), "flywheel-test/does-not-exist",
                        "Hub")


# ----------------------------------------------------------------------------------------------- LeRobot v2.1


def test_v21_missing_video(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    (root / V21_VIDEO_1).unlink()
    expect_ingest_error(store, IngestConfig(source=str(root)), "episode_000001.mp4", "not found")


def test_v21_video_shorter_than_its_episode(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    frames = read_frames(root / V21_VIDEO_1, 0, 1.0)[:, ::4, ::4]
    (root / V21_VIDEO_1).unlink()
    write_video(root / V21_VIDEO_1, np.ascontiguousarray(frames), fps=30)  # a valid video of 1 s, episode is 7.4 s
    expect_ingest_error(store, IngestConfig(source=str(root)), "episode_000001.mp4", "truncated", "7.367")


def test_v21_fps_mismatch(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    frames = read_frames(root / V21_VIDEO_1, 0, 0.5)[:, ::4, ::4]
    (root / V21_VIDEO_1).unlink()
    write_video(root / V21_VIDEO_1, np.ascontiguousarray(frames), fps=15)
    expect_ingest_error(store, IngestConfig(source=str(root)), "episode_000001.mp4", "15 fps", "30 fps")


def test_v21_broken_metadata(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21, copied=("meta/episodes_stats.jsonl",))
    (root / "meta" / "episodes_stats.jsonl").write_text("{not json\n")
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/episodes_stats.jsonl", "not valid JSON")


def test_v21_failed_conversion_leaves_no_dataset_artifact(robot_datasets, store, tmp_path):
    # Valid JSON lines without the per-episode stats pass the pre-checks but break LeRobot's converter,
    # which runs on a copy inside the store's temp dir.
    root = linked_copy(robot_datasets / V21, tmp_path / V21, copied=("meta/episodes_stats.jsonl",))
    (root / "meta" / "episodes_stats.jsonl").write_text("".join(f'{{"episode_index": {i}}}\n' for i in range(3)))
    expect_ingest_error(store, IngestConfig(source=str(root)), V21, "conversion failed", "stats")
    assert (root / "meta" / "info.json").is_symlink()  # the input itself was never converted in place
    assert not (tmp_path / f"{V21}_old").exists() and not (tmp_path / f"{V21}_v30").exists()


# ----------------------------------------------------------------------------------------------- raw videos


def test_raw_caption_without_video(clips, store, tmp_path):
    folder = make_raw_folder(clips, tmp_path / "raw")
    (folder / "metas" / "lonely.txt").write_text("A caption for a video that is not there.")
    expect_ingest_error(store, IngestConfig(source=str(folder)), "metas/lonely.txt", "without a video")


def test_raw_video_without_caption(clips, store, tmp_path):
    folder = make_raw_folder(clips, tmp_path / "raw")
    (folder / "metas" / "pick_01.txt").unlink()
    expect_ingest_error(store, IngestConfig(source=str(folder)), "videos/pick_01.mp4", "without a caption")


def test_raw_empty_folder_and_empty_caption(clips, store, tmp_path):
    empty = tmp_path / "empty"
    (empty / "videos").mkdir(parents=True)
    (empty / "metas").mkdir()
    expect_ingest_error(store, IngestConfig(source=str(empty)), "empty/videos", "0 episodes")

    folder = make_raw_folder(clips, tmp_path / "raw")
    (folder / "metas" / "pick_02.txt").write_text("  \n")
    expect_ingest_error(store, IngestConfig(source=str(folder)), "metas/pick_02.txt", "empty")


def test_raw_undecodable_and_unknown_camera(clips, store, tmp_path):
    folder = make_raw_folder(clips, tmp_path / "raw")
    expect_ingest_error(store, IngestConfig(source=str(folder), camera_key="wrist"), "raw", "'video'")

    (folder / "videos" / "pick_01.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(5000))
    expect_ingest_error(store, IngestConfig(source=str(folder)), "videos/pick_01.mp4", "decoded|corrupt")
