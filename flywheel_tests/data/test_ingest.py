"""Ingest of real demonstrations: LeRobot v3.0, LeRobot v2.1 (converted with LeRobot's own code), raw videos."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from flywheel.data.ingest import IngestConfig, IngestError, detect_format, ingest, load_manifest
from flywheel.data.manifest import MANIFEST_COLUMNS
from flywheel.data.splits import assign_splits
from flywheel.data.video import read_frames, write_video
from flywheel.store import ArtifactStore, hash_tree

CAMERA = "observation.images.cam_high"
V3 = "g1_pick_bottle"
V21 = "g1_pick_bottle_v21"


# ----------------------------------------------------------------------------------------------- helpers


def linked_copy(source: Path, destination: Path, copied: tuple[str, ...] = ()) -> Path:
    """A dataset copy whose files are symlinks to `source`, except `copied` (relative paths): real,
    writable copies a test may corrupt. Cheap for the 76 MB dataset; the shared files stay untouched."""
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(source).as_posix()
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if relative in copied:
            shutil.copyfile(path, target)
        else:
            os.symlink(path, target)
    return destination


def cut_clips(shared: Path, folder: Path, count: int = 3) -> dict[str, int]:
    """Short H.264 clips cut from the real robot video (downscaled 4x): {stem: number of frames}."""
    video = shared / V3 / "videos" / CAMERA / "chunk-000" / "file-000.mp4"
    lengths = {}
    for i in range(count):
        frames = read_frames(video, 20.0 * i, 20.0 * i + (10 + i) / 30)[:, ::4, ::4]
        write_video(folder / f"pick_{i:02d}.mp4", np.ascontiguousarray(frames), fps=30)
        lengths[f"pick_{i:02d}"] = len(frames)
    return lengths


def make_raw_folder(clips: Path, destination: Path, stems=None) -> Path:
    """videos/<stem>.mp4 + metas/<stem>.txt, the diffusers Cosmos LoRA recipe layout."""
    (destination / "videos").mkdir(parents=True)
    (destination / "metas").mkdir()
    for clip in sorted(clips.glob("*.mp4")):
        if stems is None or clip.stem in stems:
            shutil.copyfile(clip, destination / "videos" / clip.name)
            caption = f"A humanoid robot picks up a bottle, take {clip.stem}.\n"
            (destination / "metas" / f"{clip.stem}.txt").write_text(caption)
    return destination


@pytest.fixture(scope="module")
def clips(robot_datasets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    return folder, cut_clips(robot_datasets, folder)


# ----------------------------------------------------------------------------------------------- v3.0


def test_lerobot_v3_manifest_matches_the_dataset_metadata(robot_datasets, store):
    root = robot_datasets / V3
    info = json.loads((root / "meta" / "info.json").read_text())
    meta = pd.read_parquet(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")

    manifest = ingest(IngestConfig(source=str(root)), store, progress=lambda event: None)
    frame = manifest.frame

    assert list(frame.columns) == list(MANIFEST_COLUMNS)
    assert len(frame) == 12 == info["total_episodes"]
    assert frame["num_frames"].tolist() == meta["length"].tolist()
    assert frame["num_frames"].sum() == 4350 == info["total_frames"]
    assert set(frame["fps"]) == {30.0}
    assert set(frame["camera_key"]) == {CAMERA}
    assert set(frame["source"]) == {"lerobot-v3.0"}
    assert set(frame["dataset_root"]) == {str(root.resolve())}
    assert frame["episode_id"].tolist() == [f"{V3}/{i:06d}" for i in range(12)]
    assert set(frame["task"]) == {"Pick up the yellow bottle on the table."}
    np.testing.assert_allclose(frame["from_timestamp"], meta[f"videos/{CAMERA}/from_timestamp"])
    np.testing.assert_allclose(frame["to_timestamp"], meta[f"videos/{CAMERA}/to_timestamp"])
    # Episodes 0-5 live in file-000.mp4, 6-11 in file-001.mp4.
    assert [Path(p).name for p in frame["video_path"]] == ["file-000.mp4"] * 6 + ["file-001.mp4"] * 6
    assert frame["content_hash"].str.fullmatch(r"[0-9a-f]{64}").all() and frame["content_hash"].is_unique
    assert set(frame["split"]) <= {"train", "val", "test"} and (frame["split"] == "train").sum() >= 6

    summary = manifest.summary
    assert (summary["episodes"], summary["frames"], summary["fps"], summary["camera_key"]) == (12, 4350, 30.0, CAMERA)
    assert sum(summary["splits"].values()) == 12 and sum(summary["split_frames"].values()) == 4350
    assert summary["splits"]["train"] == (frame["split"] == "train").sum()

    # The artifact on disk is the same manifest.
    assert manifest.path == store.path("manifests", manifest.key) and store.exists("manifests", manifest.key)
    loaded = load_manifest(manifest.path / "manifest.parquet")
    pd.testing.assert_frame_equal(loaded.frame, frame)
    assert loaded.summary == json.loads(json.dumps(summary)) and loaded.key == manifest.key

    # The time range of an episode in the second file holds exactly its frames.
    row = frame.iloc[9]
    decoded = read_frames(row["video_path"], row["from_timestamp"], row["to_timestamp"])
    assert decoded.shape == (row["num_frames"], 480, 640, 3)


def test_reingest_returns_the_existing_artifact_and_content_hashes_follow_content(robot_datasets, store, tmp_path):
    config = IngestConfig(source=str(robot_datasets / V3))
    first = ingest(config, store)
    table = first.path / "manifest.parquet"
    written = table.stat().st_mtime_ns

    again = ingest(config, store)
    assert again.key == first.key and again.path == first.path
    assert table.stat().st_mtime_ns == written  # not rewritten
    assert [p.name for p in (store.home / "manifests").iterdir()] == [first.key]
    pd.testing.assert_frame_equal(again.frame, first.frame)

    # The same bytes in another folder: a new manifest (its rows point elsewhere), the same episode hashes.
    moved = ingest(IngestConfig(source=str(linked_copy(robot_datasets / V3, tmp_path / "copy" / V3))), store)
    assert moved.key != first.key
    assert moved.frame["content_hash"].tolist() == first.frame["content_hash"].tolist()
    assert moved.frame["split"].tolist() == first.frame["split"].tolist()  # same episode ids, same splits

    # Another split config is another manifest.
    other = ingest(IngestConfig(source=str(robot_datasets / V3), val_fraction=0.3), store)
    assert other.key != first.key and other.summary["splits"]["val"] >= first.summary["splits"]["val"]


# ----------------------------------------------------------------------------------------------- v2.1


@pytest.fixture(scope="module")
def converted(robot_datasets, tmp_path_factory):
    """The v2.1 dataset ingested once per module (conversion imports LeRobot: the slow part)."""
    source = robot_datasets / V21
    before = hash_tree(source)
    siblings = sorted(p.name for p in robot_datasets.iterdir())
    store = ArtifactStore(tmp_path_factory.mktemp("home"))
    manifest = ingest(IngestConfig(source=str(source), allow_no_holdout=True), store)
    return dict(store=store, manifest=manifest, before=before, siblings=siblings, source=source)


def test_lerobot_v21_is_converted_on_a_copy_into_an_artifact(converted, robot_datasets):
    store, manifest = converted["store"], converted["manifest"]
    frame = manifest.frame

    # The shared v2.1 folder is untouched: same content, no <name>_old / <name>_v30 next to it.
    assert hash_tree(converted["source"]) == converted["before"]
    assert sorted(p.name for p in robot_datasets.iterdir()) == converted["siblings"]

    assert len(frame) == 3 and frame["num_frames"].tolist() == [278, 221, 277] and frame["num_frames"].sum() == 776
    assert set(frame["source"]) == {"lerobot-v2.1"} and set(frame["fps"]) == {30.0}
    assert frame["episode_id"].tolist() == [f"{V21}/{i:06d}" for i in range(3)]
    assert (frame["split"] == "train").any()

    root = Path(frame["dataset_root"].iloc[0])
    assert root.parent == store.home / "datasets" and store.exists("datasets", root.name)
    assert json.loads((root / "meta" / "info.json").read_text())["codebase_version"] == "v3.0"
    assert not (root / ".convert").exists()
    assert [p.name for p in (store.home / "datasets").iterdir()] == [root.name]  # no temp dirs left
    for row in frame.itertuples():
        assert Path(row.video_path).is_file() and Path(row.video_path).is_relative_to(root)

    # The converted frame data is the original data, episode by episode.
    converted_data = pd.read_parquet(root / "data" / "chunk-000" / "file-000.parquet")
    for index in range(3):
        original = pd.read_parquet(converted["source"] / "data" / "chunk-000" / f"episode_{index:06d}.parquet")
        mine = converted_data[converted_data["episode_index"] == index]
        np.testing.assert_array_equal(np.stack(mine["action"]), np.stack(original["action"]))


def test_converted_dataset_loads_with_lerobot(converted):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(converted["manifest"].frame["dataset_root"].iloc[0])
    dataset = LeRobotDataset(V21, root=root, video_backend="pyav")
    assert dataset.num_episodes == 3 and dataset.num_frames == 776
    item = dataset[300]  # inside episode 1
    assert int(item["episode_index"]) == 1
    assert tuple(item[CAMERA].shape) == (3, 480, 640)


def test_reingest_of_v21_reuses_manifest_and_converted_dataset(converted):
    store, first = converted["store"], converted["manifest"]
    converted_root = Path(first.frame["dataset_root"].iloc[0])
    stamp = (converted_root / "meta" / "info.json").stat().st_mtime_ns

    again = ingest(IngestConfig(source=str(converted["source"]), allow_no_holdout=True), store)
    assert again.key == first.key
    pd.testing.assert_frame_equal(again.frame, first.frame)

    # A new split config reads the existing conversion instead of converting again.
    other = ingest(IngestConfig(source=str(converted["source"]), val_fraction=0.75, test_fraction=0.0), store)
    assert other.key != first.key
    assert other.frame["dataset_root"].iloc[0] == str(converted_root)
    assert other.frame["content_hash"].tolist() == first.frame["content_hash"].tolist()
    assert (converted_root / "meta" / "info.json").stat().st_mtime_ns == stamp
    assert len(list((store.home / "datasets").iterdir())) == 1


def test_v21_conversion_never_copies_what_links_point_to(robot_datasets, store, tmp_path):
    """Links inside a dataset (relative ones too, as in a Hub cache) are read, never followed into the home:
    a stray link to a big folder outside the dataset leaves no trace in the converted artifact."""
    root = linked_copy(robot_datasets / V21, tmp_path / V21)
    for link in [p for p in root.rglob("*") if p.is_symlink()][::2]:  # half of them relative
        target = os.readlink(link)
        link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.bin").write_bytes(b"secret" * 100_000)
    (root / "scratch").symlink_to(outside)
    (root / "meta" / "notes.bin").symlink_to(outside / "private.bin")

    # The copy the converter works on (inside the store's temp dir) holds links, not the targets' bytes.
    from flywheel.data.lerobot_source import copy_dataset

    copy_dataset(root, tmp_path / "copy")
    copied = [p for p in (tmp_path / "copy").rglob("*") if p.is_file() and not p.is_symlink()]
    assert copied == [] and (tmp_path / "copy" / "scratch").is_symlink()
    assert (tmp_path / "copy" / "meta" / "info.json").read_bytes() == (root / "meta" / "info.json").read_bytes()

    manifest = ingest(IngestConfig(source=str(root), allow_no_holdout=True), store)
    converted = Path(manifest.frame["dataset_root"].iloc[0])
    assert manifest.summary["episodes"] == 3 and store.verify("datasets", converted.name) > 0
    assert not [p for p in converted.rglob("*") if p.is_symlink()]
    assert not [p for p in store.home.rglob("*") if p.is_file() and p.stat().st_size == 600_000]
    assert (outside / "private.bin").is_file() and (root / "scratch").is_symlink()  # the source is untouched


# ----------------------------------------------------------------------------------------------- raw videos


def test_raw_video_folder(clips, store, tmp_path):
    clip_dir, lengths = clips
    folder = make_raw_folder(clip_dir, tmp_path / "robot_clips")

    manifest = ingest(IngestConfig(source=str(folder), format="raw-videos", allow_no_holdout=True), store)
    frame = manifest.frame

    assert frame["episode_id"].tolist() == [f"robot_clips/{s}" for s in sorted(lengths)]
    assert frame["episode_index"].tolist() == [0, 1, 2]
    assert frame["num_frames"].tolist() == [lengths[s] for s in sorted(lengths)]
    assert set(frame["camera_key"]) == {"video"} and set(frame["source"]) == {"raw-videos"}
    assert set(frame["fps"]) == {30.0}
    assert frame["task"].iloc[1] == "A humanoid robot picks up a bottle, take pick_01."
    assert frame["video_path"].tolist() == [str(folder.resolve() / "videos" / f"{s}.mp4") for s in sorted(lengths)]
    np.testing.assert_allclose(frame["from_timestamp"], 0.0)
    np.testing.assert_allclose(frame["to_timestamp"], frame["num_frames"] / 30.0)
    assert (frame["split"] == "train").any() and manifest.summary["frames"] == sum(lengths.values())
    for row in frame.itertuples():
        assert len(read_frames(row.video_path, row.from_timestamp, row.to_timestamp)) == row.num_frames

    # Changing a caption changes that episode's content hash (the caption is its task) and the key.
    (folder / "metas" / "pick_00.txt").write_text("Another description.")
    changed = ingest(IngestConfig(source=str(folder), allow_no_holdout=True), store)
    assert changed.key != manifest.key
    assert changed.frame["content_hash"].tolist()[1:] == frame["content_hash"].tolist()[1:]
    assert changed.frame["content_hash"].iloc[0] != frame["content_hash"].iloc[0]


def test_split_of_an_episode_never_changes_when_episodes_are_added(clips, store, tmp_path):
    clip_dir, lengths = clips
    folder = make_raw_folder(clip_dir, tmp_path / "demos", stems={"pick_00", "pick_02"})
    config = IngestConfig(source=str(folder), val_fraction=0.4, test_fraction=0.3)
    before = ingest(config, store)

    shutil.copyfile(clip_dir / "pick_01.mp4", folder / "videos" / "pick_01.mp4")
    (folder / "metas" / "pick_01.txt").write_text("A new demonstration.")
    after = ingest(config, store)

    assert after.key != before.key and len(after.frame) == 3
    old = before.frame.set_index("episode_id")["split"]
    new = after.frame.set_index("episode_id")["split"]
    assert sorted(old) == ["train", "val"]  # one held out, so a move would show
    assert new[old.index].tolist() == old.tolist()


def test_assign_splits_is_stable_proportional_and_keeps_train_non_empty():
    ids = [f"robot/{i:06d}" for i in range(2000)]
    splits = assign_splits(ids, val_fraction=0.1, test_fraction=0.2)
    grown = assign_splits(ids + [f"robot/{i:06d}" for i in range(2000, 2500)], val_fraction=0.1, test_fraction=0.2)
    assert grown[:2000] == splits
    assert splits == assign_splits(list(ids), 0.1, 0.2)  # deterministic
    assert abs(splits.count("val") / 2000 - 0.1) < 0.03 and abs(splits.count("test") / 2000 - 0.2) < 0.03

    for n in range(1, 8):  # with 90% held out, a handful of episodes would often leave train empty
        assert "train" in assign_splits([f"few/{i}" for i in range(n)], val_fraction=0.45, test_fraction=0.45)
    assert assign_splits([], 0.1, 0.1) == []


def test_detect_format_and_config_validation(robot_datasets, clips, tmp_path):
    assert detect_format(robot_datasets / V3) == "lerobot-v3.0"
    assert detect_format(robot_datasets / V21) == "lerobot-v2.1"
    assert detect_format(make_raw_folder(clips[0], tmp_path / "raw")) == "raw-videos"

    with pytest.raises(ValidationError, match="unknown_field|Extra inputs"):
        IngestConfig(source="x", unknown_field=1)
    with pytest.raises(ValidationError, match="below 1"):
        IngestConfig(source="x", val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValidationError):
        IngestConfig(source="x", format="lerobot-v1.6")
    assert issubclass(IngestError, ValueError)


def test_sample_decoding_for_large_datasets(robot_datasets, tmp_path):
    """decode="sample" reads each episode's first, middle and last frame instead of every frame: same manifest."""
    root = robot_datasets / "pusht_rotated"
    full = ingest(IngestConfig(source=str(root)), ArtifactStore(tmp_path / "a"))
    sampled = ingest(IngestConfig(source=str(root), decode="sample"), ArtifactStore(tmp_path / "b"))
    pd.testing.assert_frame_equal(full.frame, sampled.frame)
    with pytest.raises(ValidationError):
        IngestConfig(source=str(root), decode="none")


def test_a_manifest_written_before_split_keys_still_loads(robot_datasets, store):
    """Schema 2 manifests (in existing homes) had no split_key: their split came from the episode id."""
    manifest = ingest(IngestConfig(source=str(robot_datasets / "pusht_rotated")), store)
    old = manifest.path.parent / "old"
    old.mkdir()
    manifest.frame.drop(columns=["split_key"]).to_parquet(old / "manifest.parquet", index=False)
    loaded = load_manifest(old)
    assert list(loaded.frame.columns) == list(MANIFEST_COLUMNS)
    assert loaded.frame["split_key"].tolist() == loaded.frame["episode_id"].tolist()
