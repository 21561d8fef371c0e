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
import pandas as pd
import pytest
from pydantic import ValidationError

from flywheel.data.ingest import IngestConfig, IngestError, ingest
from flywheel.data.video import read_frames, write_video
from flywheel_tests.data.test_ingest import CAMERA, V3, V21, cut_clips, linked_copy, make_raw_folder

DATA = "data/chunk-000/file-000.parquet"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"
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
    words = message.replace(str(store.home.parent), "<tmp>")  # the words must not come from a test's folder name
    for word in also:
        assert re.search(word, words, re.IGNORECASE), f"{word!r} not in: {message}"
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


# ----------------------------------------------------------------------------------------------- inputs that used to pass
# Each of these was accepted silently (exit 0) before ingest checked the frames, the tables and the totals.

PUSHT = "pusht_rotated"
PUSHT_VIDEO = "videos/observation.image/chunk-000/file-000.mp4"


def edit_table(path: Path, change) -> None:
    table = pd.read_parquet(path)
    change(table)
    table.to_parquet(path, index=False)


def test_flipped_bytes_mid_stream_fail_at_ingest_naming_file_and_time(robot_datasets, store, tmp_path):
    """4 KB inverted in the middle of an AV1 stream: every packet still demuxes; only decoding notices."""
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(VIDEO_000,))
    video = root / VIDEO_000
    data = bytearray(video.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    video.write_bytes(bytes(data))
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-000.mp4", "corrupt", r"at about \d+\.\d{3}s")


def test_h264_damage_is_not_concealed(clips, store, tmp_path):
    """FFmpeg's H.264 decoder patches over a damaged slice unless asked to fail; ingest asks."""
    folder = make_raw_folder(clips, tmp_path / "raw")
    video = folder / "videos" / "pick_01.mp4"
    data = bytearray(video.read_bytes())
    at = len(data) * 2 // 3
    data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
    video.write_bytes(bytes(data))
    expect_ingest_error(store, IngestConfig(source=str(folder)), "videos/pick_01.mp4", "corrupt")


def test_missing_action_feature(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json", DATA))
    info = json.loads((root / "meta" / "info.json").read_text())
    del info["features"]["action"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    edit_table(root / DATA, lambda t: t.drop(columns=["action"], inplace=True))
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/info.json", "no 'action' feature",
                        "observation.state", "required_features")


def test_declared_column_missing_from_the_data(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(DATA,))
    edit_table(root / DATA, lambda t: t.drop(columns=["action"], inplace=True))
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, "no column 'action'", "declares")


def test_actions_stored_as_strings(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(DATA,))

    def as_text(table):
        table["action"] = [json.dumps(np.asarray(a).tolist()) for a in table["action"]]
    edit_table(root / DATA, as_text)
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, "'action' holds text", "float32")


def test_infinite_actions_name_their_rows(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(DATA,))

    def infinite(table):
        rows = table.index[(table["episode_index"] == 2) & table["frame_index"].isin([5, 6])]
        table["action"] = [np.where(i in rows, np.inf, a).astype(np.float32) for i, a in zip(table.index, table["action"])]
    edit_table(root / DATA, infinite)
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, "action is NaN or infinite in 2 of 4350 rows",
                        "episode 2 frame 5, episode 2 frame 6")


def test_every_state_nan(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(DATA,))
    edit_table(root / DATA, lambda t: t.__setitem__(
        "observation.state", [np.full(26, np.nan, np.float32) for _ in range(len(t))]))
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, "observation.state is NaN or infinite in 4350 of "
                        "4350 rows", r"episode 0 frame 0, .* \.\.\.")


def test_action_shape_that_disagrees_with_info(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["action"]["shape"] = [25]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, r"shape \[26\]", r"declares \[25\]")


def test_episodes_missing_from_the_metadata(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=(EPISODES,))
    edit_table(root / EPISODES, lambda t: t.drop(index=t.index[t["episode_index"] >= 9], inplace=True))
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, r"episodes \[9, 10, 11\]",
                        "3 of 12 episodes missing from the metadata")


def test_info_json_totals_that_disagree_with_the_dataset(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    edit_json(root / "meta" / "info.json", total_episodes=99)
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/info.json", "total_episodes is 99", "lists 12")
    edit_json(root / "meta" / "info.json", total_episodes=12, total_frames=5000)
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/info.json", "total_frames is 5000", "4350")


@pytest.mark.parametrize("fps", ["ten", "30", True, 0, -30, None])
def test_fps_that_is_not_a_positive_number(robot_datasets, store, tmp_path, fps):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/info.json",))
    edit_json(root / "meta" / "info.json", fps=fps)
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/info.json", "'fps' is", "positive number")


def test_missing_tasks_and_unknown_task_index(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V3, tmp_path / V3, copied=("meta/tasks.parquet",))
    tasks = pd.read_parquet(root / "meta" / "tasks.parquet")
    (root / "meta" / "tasks.parquet").unlink()
    expect_ingest_error(store, IngestConfig(source=str(root)), "meta/tasks.parquet", "not found", "prompts")
    tasks.assign(task_index=[5]).to_parquet(root / "meta" / "tasks.parquet")
    expect_ingest_error(store, IngestConfig(source=str(root)), DATA, r"task_index \[0\] not in", "tasks.parquet")


def test_video_resolution_that_disagrees_with_info(robot_datasets, store, tmp_path):
    """A 64x64 video under an info.json that says 96x96 used to pass ingest and stall the clips stage."""
    import cv2

    root = linked_copy(robot_datasets / PUSHT, tmp_path / PUSHT)
    frames = read_frames(root / PUSHT_VIDEO)
    (root / PUSHT_VIDEO).unlink()
    small = np.stack([cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames])
    write_video(root / PUSHT_VIDEO, small, fps=10)
    expect_ingest_error(store, IngestConfig(source=str(root)), "file-000.mp4", "64x64", "96x96", "re-encode")


def keep_episodes(source: Path, root: Path, keep: list[int]) -> Path:
    """A linked v3.0 copy cut down to some of its episodes (their rows and metadata; the video stays whole)."""
    linked_copy(source, root, copied=(DATA, EPISODES, "meta/info.json"))
    edit_table(root / DATA, lambda t: t.drop(index=t.index[~t["episode_index"].isin(keep)], inplace=True))
    edit_table(root / EPISODES, lambda t: t.drop(index=t.index[~t["episode_index"].isin(keep)], inplace=True))
    frames = len(pd.read_parquet(root / DATA))
    edit_json(root / "meta" / "info.json", total_episodes=len(keep), total_frames=frames)
    return root


def test_a_dataset_too_small_to_hold_out_an_episode(robot_datasets, store, tmp_path):
    root = keep_episodes(robot_datasets / PUSHT, tmp_path / PUSHT, [0])
    expect_ingest_error(store, IngestConfig(source=str(root)), PUSHT, "1 real episode", "holds none of them out",
                        "allow_no_holdout: true")
    manifest = ingest(IngestConfig(source=str(root), allow_no_holdout=True), store)
    assert manifest.frame["split"].tolist() == ["train"] and manifest.summary["episodes"] == 1


def test_config_floats_are_finite():
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValidationError):
            IngestConfig(source="x", val_fraction=bad)


# ----------------------------------------------------------------------------------------------- LeRobot v2.1


def test_v21_missing_video(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    (root / V21_VIDEO_1).unlink()
    expect_ingest_error(store, IngestConfig(source=str(root)), "episode_000001.mp4", "not found")


def test_v21_video_shorter_than_its_episode(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    frames = read_frames(root / V21_VIDEO_1, 0, 1.0)
    (root / V21_VIDEO_1).unlink()
    write_video(root / V21_VIDEO_1, frames, fps=30)  # a valid video of 1 s, episode is 7.4 s
    expect_ingest_error(store, IngestConfig(source=str(root)), "episode_000001.mp4", "truncated", "7.367")


def test_v21_fps_mismatch(robot_datasets, store, tmp_path):
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    frames = read_frames(root / V21_VIDEO_1, 0, 0.5)
    (root / V21_VIDEO_1).unlink()
    write_video(root / V21_VIDEO_1, frames, fps=15)
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
