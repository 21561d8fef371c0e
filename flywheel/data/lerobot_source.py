"""LeRobot datasets as ingest input: read (and check) a v3.0 root; check and convert a v2.1 one.

v3.0 layout (LeRobot's contract; paths come from the templates in meta/info.json):
  meta/info.json                      fps, features (video features have dtype "video"), path templates
  meta/episodes/chunk-*/file-*.parquet  one row per episode: length, tasks, data/{chunk,file}_index,
                                      videos/<camera>/{chunk_index,file_index,from_timestamp,to_timestamp}
  data/chunk-*/file-*.parquet         frame rows of many episodes (column episode_index)
  videos/<camera>/chunk-*/file-*.mp4  many episodes back to back

The metadata is read with pandas rather than LeRobotDatasetMetadata: that class falls back to a Hub
download when a file is missing, which turns a local typo into a network error, and importing LeRobot
costs seconds. LeRobot itself is imported only to convert v2.1 and to download from the Hub.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.data.ingest import (IngestConfig, IngestError, Progress, check_sample_decodes, episode_video_hash,
                                  scan_video)

SUPPORTED_VERSIONS = {"v3.0": "lerobot-v3.0", "v2.1": "lerobot-v2.1"}
# Bookkeeping columns that say where an episode sits, not what happened in it.
POSITION_COLUMNS = {"index", "episode_index"}
# LeRobot's own per-frame columns: present in every dataset, not recorded signals.
DEFAULT_FEATURES = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
# What an episode's split does not depend on: where it sits, how tasks are numbered, whether a refresh flagged
# it (a refreshed version rewrites the data with `is_synthetic` and may renumber tasks when merging).
SPLIT_IGNORED_COLUMNS = POSITION_COLUMNS | {"task_index", "is_synthetic"}
NUMERIC_DTYPES = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64"}
ROWS_NAMED = 5  # how many bad rows a message lists


def load_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise IngestError(f"{path}: not found; a LeRobot dataset root must contain meta/info.json")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(info, dict):
        raise IngestError(f"{path}: must hold a JSON object; is this a LeRobot dataset?")
    for field in ("codebase_version", "fps", "features"):
        if field not in info:
            raise IngestError(f"{path}: has no {field!r} field; is this a LeRobot dataset?")
    features = info["features"]
    if not isinstance(features, dict) or not all(isinstance(f, dict) and "dtype" in f for f in features.values()):
        raise IngestError(f"{path}: 'features' must map each feature name to an object with a 'dtype'; "
                          "the metadata is damaged, re-export the dataset")
    return info


def info_fps(info: dict, info_path: Path) -> float:
    """The dataset's frame rate: a positive number (JSON's true/false and strings are refused)."""
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise IngestError(f"{info_path}: 'fps' is {fps!r}; it must be a positive number of frames per second "
                          "(e.g. 30), the rate the videos were recorded at")
    return float(fps)


def info_count(info: dict, field: str, info_path: Path) -> int | None:
    if field not in info:
        return None
    value = info[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IngestError(f"{info_path}: {field!r} is {value!r}; it must be a whole number")
    return value


def lerobot_version(root: Path) -> str:
    """"lerobot-v3.0" or "lerobot-v2.1" from meta/info.json's codebase_version."""
    info = load_info(root)
    version = str(info["codebase_version"])
    if version not in SUPPORTED_VERSIONS:
        raise IngestError(f"{root / 'meta' / 'info.json'}: codebase_version {version!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_VERSIONS)} (convert older datasets with LeRobot first)")
    return SUPPORTED_VERSIONS[version]


def video_features(info: dict) -> list[str]:
    return [k for k, f in info["features"].items() if f.get("dtype") == "video"]


def resolve_camera(info: dict, camera_key: str | None, info_path: Path) -> str:
    cameras = video_features(info)
    if not cameras:
        raise IngestError(f"{info_path}: the dataset has no video features; ingest needs camera video")
    if camera_key is None:
        return cameras[0]
    if camera_key not in cameras:
        raise IngestError(f"{info_path}: unknown camera_key {camera_key!r}; available: {', '.join(cameras)}")
    return camera_key


def camera_size(info: dict, camera: str, info_path: Path) -> tuple[tuple[int, int], str]:
    """(height, width) that info.json gives a camera, and where it says so. LeRobot writes both the feature's
    shape (with names) and, since v2.0, the stream's own `info.video.height/width`; they must agree."""
    feature = info["features"][camera]
    shape, names = feature.get("shape"), feature.get("names")
    where = f"{info_path} (features.{camera}.shape)"
    if not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(n, int) and n > 0 for n in shape):
        raise IngestError(f"{where}: is {shape!r}; a video feature's shape is [height, width, channels]")
    if isinstance(names, list) and "height" in names and "width" in names:
        size = (shape[names.index("height")], shape[names.index("width")])
    else:
        size = (shape[1], shape[2]) if shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4) else (shape[0], shape[1])
    stream = feature.get("info") or {}
    if "video.height" in stream and "video.width" in stream:
        recorded = (stream["video.height"], stream["video.width"])
        if recorded != size:
            raise IngestError(f"{where}: says {size[0]}x{size[1]} (height x width) but its info.video.height/width "
                              f"say {recorded[0]}x{recorded[1]}; the metadata contradicts itself, fix it")
    return size, where


def recorded_features(info: dict, required: list[str], info_path: Path) -> dict[str, dict]:
    """The numeric per-frame features ingest checks (required ones first), after checking the required ones
    are declared and numeric."""
    features = info["features"]
    for name in required:
        if name not in features:
            numeric = sorted(k for k, f in features.items() if f.get("dtype") in NUMERIC_DTYPES and k not in DEFAULT_FEATURES)
            raise IngestError(f"{info_path}: the dataset has no {name!r} feature (numeric features: "
                              f"{', '.join(numeric) or 'none'}); inverse dynamics, the quality filters and refresh "
                              f"read it. Record it, or set ingest.required_features to what the dataset has")
        if features[name].get("dtype") not in NUMERIC_DTYPES:
            raise IngestError(f"{info_path}: feature {name!r} has dtype {features[name].get('dtype')!r}; it must be "
                              f"numeric ({', '.join(sorted(NUMERIC_DTYPES))})")
    checked = {name: features[name] for name in required}
    checked.update({k: f for k, f in features.items()
                    if f.get("dtype") in NUMERIC_DTYPES and k not in DEFAULT_FEATURES and k not in checked})
    return checked


def read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise IngestError(f"{path}: not found; the dataset is incomplete (copy or download it again)")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise IngestError(f"{path}: cannot be read as parquet ({e})") from None


def feature_values(column: pd.Series, path: Path, name: str, feature: dict) -> np.ndarray:
    """A feature column as one numeric array [rows, *shape]; IngestError for text, ragged rows or a wrong shape."""
    values = column.to_numpy()
    if values.dtype == object and len(values):
        try:
            values = np.stack([np.asarray(v) for v in values])
        except ValueError:
            raise IngestError(f"{path}: column {name!r} has rows of different lengths; each frame's {name} must "
                              f"have shape {feature.get('shape')}") from None
    if values.dtype.kind not in "biuf":
        example = str(column.iloc[0])[:40] if len(column) else ""
        raise IngestError(f"{path}: column {name!r} holds {values.dtype.name if values.dtype.kind != 'U' else 'text'} "
                          f"values (first: {example!r}), but meta/info.json declares {feature.get('dtype')}; "
                          "store it as numbers (re-export the dataset)")
    shape = tuple(feature.get("shape") or ())
    if values.shape[1:] != shape and not (values.ndim == 1 and shape in ((), (1,))):
        raise IngestError(f"{path}: column {name!r} has per-frame shape {list(values.shape[1:])} but meta/info.json "
                          f"declares {list(shape)}; the data and the metadata disagree")
    return values


def check_frame_table(data: pd.DataFrame, path: Path, features: dict[str, dict]) -> None:
    """Every checked feature present, numeric, of its declared shape, and finite (NaN/inf rows named)."""
    for name, feature in features.items():
        if name not in data.columns:
            raise IngestError(f"{path}: has no column {name!r}, which meta/info.json declares "
                              f"({feature.get('dtype')} {feature.get('shape')}); the data and the metadata disagree, "
                              "re-export the dataset")
        values = feature_values(data[name], path, name, feature)
        if values.dtype.kind != "f":
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            rows = data.loc[bad]
            where = [f"episode {int(e)} frame {int(f)}" for e, f in
                     zip(rows.get("episode_index", [-1] * len(rows)), rows.get("frame_index", rows.index))][:ROWS_NAMED]
            raise IngestError(f"{path}: {name} is NaN or infinite in {int(bad.sum())} of {len(values)} rows "
                              f"({', '.join(where)}{', ...' if bad.sum() > ROWS_NAMED else ''}); repair those frames "
                              "or remove their episodes (lerobot's delete_episodes)")


def hash_rows(rows: pd.DataFrame, ignored: set[str] = POSITION_COLUMNS) -> str:
    """sha256 of an episode's frame rows, column by column in name order (values, dtype and shape)."""
    digest = hashlib.sha256()
    for name in sorted(c for c in rows.columns if c not in ignored):
        column = rows[name]
        values = np.stack(column.to_numpy()) if column.dtype == object and len(column) else column.to_numpy()
        if values.dtype == object:  # strings and other Python objects
            data = json.dumps(values.tolist(), default=str).encode()
        else:
            data = np.ascontiguousarray(values).tobytes()
        digest.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(data)
    return digest.hexdigest()


def split_key_of(rows: pd.DataFrame) -> str:
    """What decides an episode's split: its recorded frames (positions, task numbering and the refresh flag left
    out), so renaming the folder or the domain, renumbering episodes or refreshing the dataset never moves it."""
    return hash_rows(rows, SPLIT_IGNORED_COLUMNS)


def episode_task(tasks) -> str:
    tasks = [str(t) for t in (tasks if tasks is not None else [])]
    return "; ".join(tasks)


def load_tasks(root: Path, info: dict, info_path: Path) -> pd.DataFrame:
    """meta/tasks.parquet (task text as index, column task_index): required, since the task is the prompt."""
    path = root / "meta" / "tasks.parquet"
    if not path.is_file():
        raise IngestError(f"{path}: not found; a LeRobot v3.0 dataset lists its tasks there (the text prompts "
                          "generation is conditioned on); copy the file from the original dataset or re-export it")
    tasks = read_parquet(path)
    if "task_index" not in tasks.columns or tasks.empty:
        raise IngestError(f"{path}: lists no tasks (needs a task_index column and one row per task); re-export it")
    expected = info_count(info, "total_tasks", info_path)
    if expected is not None and expected != len(tasks):
        raise IngestError(f"{info_path}: total_tasks is {expected} but {path.name} lists {len(tasks)}; "
                          "the metadata disagrees with itself, regenerate it with LeRobot")
    return tasks


# ----------------------------------------------------------------------------------------------- v3.0


def read_lerobot_v3(root: Path, config: IngestConfig, dataset_name: str, report: Progress,
                    decode: bool = True) -> list[dict]:
    """Every episode of a v3.0 dataset as a manifest row (video path relative to `root`), all checked.

    Cheap checks first (metadata, tables), then the videos: a dataset with a metadata error fails in
    milliseconds, and one with a damaged stream after decoding up to the damage."""
    root = Path(root)
    info = load_info(root)
    info_path = root / "meta" / "info.json"
    if info["codebase_version"] != "v3.0":
        raise IngestError(f"{info_path}: codebase_version is {info['codebase_version']!r}, expected 'v3.0'")
    fps = info_fps(info, info_path)
    camera = resolve_camera(info, config.camera_key, info_path)
    size, size_source = camera_size(info, camera, info_path)
    features = recorded_features(info, config.required_features, info_path)
    episodes = load_episodes(root)
    camera_columns = [f"videos/{camera}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    if missing := [c for c in camera_columns if c not in episodes.columns]:
        raise IngestError(f"{root / 'meta' / 'episodes'}: episode metadata lacks {missing}; the dataset is incomplete")
    tasks = load_tasks(root, info, info_path)

    video_files = {i: root / info["video_path"].format(
        video_key=camera, chunk_index=int(ep[f"videos/{camera}/chunk_index"]),
        file_index=int(ep[f"videos/{camera}/file_index"])) for i, ep in episodes.iterrows()}
    data_files = {i: root / info["data_path"].format(
        chunk_index=int(ep["data/chunk_index"]), file_index=int(ep["data/file_index"]))
        for i, ep in episodes.iterrows()}
    for path in sorted(set(video_files.values()) | set(data_files.values())):
        if not path.is_file():
            raise IngestError(f"{path}: not found; the dataset is incomplete (copy or download it again)")
    # Every data file, also one that no episode's metadata points to: episodes missing from meta/episodes.
    all_data = sorted(set(data_files.values()) | set((root / "data").glob("chunk-*/file-*.parquet")))
    frames = {p: read_parquet(p) for p in all_data}
    check_episode_tables(root, info, info_path, episodes, frames, tasks, features)

    rows = []
    for i, ep in episodes.iterrows():
        index = int(ep["episode_index"])
        data = frames[data_files[i]]
        episode_rows = data[data["episode_index"] == index]
        task = episode_task(ep.get("tasks")) or "; ".join(
            tasks.index[tasks["task_index"].isin(set(episode_rows["task_index"]))].astype(str))
        if not task:
            raise IngestError(f"{root / 'meta' / 'episodes'}: episode {index} has no task; every episode needs its "
                              "task text (the prompt), re-export the dataset with tasks")
        rows.append(dict(
            episode_id=f"{dataset_name}/{index:06d}", episode_index=index, task=task,
            camera_key=camera, fps=fps, num_frames=int(ep["length"]),
            video_relpath=video_files[i].relative_to(root).as_posix(),
            from_timestamp=float(ep[f"videos/{camera}/from_timestamp"]),
            to_timestamp=float(ep[f"videos/{camera}/to_timestamp"]),
            rows_hash=hash_rows(episode_rows), split_key=split_key_of(episode_rows),
        ))

    decode_all = decode and config.decode == "all"
    scans = {}
    report.start("check videos", len(set(video_files.values())))
    for path in sorted(set(video_files.values())):
        scans[path] = scan_video(path, fps, f"{info_path} (fps)", expected_size=size, size_source=size_source,
                                 decode=decode_all)
        report.advance(path.name)
    report.start("check episodes", len(rows))
    for (i, _), row in zip(episodes.iterrows(), rows):
        video_hash = episode_video_hash(scans[video_files[i]], row["from_timestamp"], row["to_timestamp"],
                                        row["num_frames"], f"episode {row['episode_index']}")
        row["content_hash"] = hashlib.sha256(f"{row.pop('rows_hash')}:{video_hash}".encode()).hexdigest()
        report.advance(f"episode {row['episode_index']}")
    if decode and config.decode == "sample":
        for path in scans:
            check_sample_decodes(path, [(r["from_timestamp"], r["to_timestamp"]) for (i, _), r in
                                        zip(episodes.iterrows(), rows) if video_files[i] == path], fps)
    _keep_episode_ids(root, rows)
    return rows


def check_episode_tables(root: Path, info: dict, info_path: Path, episodes: pd.DataFrame,
                         frames: dict[Path, pd.DataFrame], tasks: pd.DataFrame, features: dict[str, dict]) -> None:
    """The frame tables against the episode metadata and info.json's totals, and their values."""
    listed = set(episodes["episode_index"].astype(int))
    if len(listed) != len(episodes):
        duplicated = sorted(set(episodes.loc[episodes["episode_index"].duplicated(), "episode_index"].astype(int)))
        raise IngestError(f"{root / 'meta' / 'episodes'}: episodes {duplicated} are listed more than once; "
                          "regenerate the metadata with LeRobot")
    lengths = dict(zip(episodes["episode_index"].astype(int), episodes["length"].astype(int)))
    total_rows, present = 0, set()
    for path, data in frames.items():
        if "episode_index" not in data.columns:
            raise IngestError(f"{path}: has no episode_index column; not a LeRobot data file")
        counts = data["episode_index"].astype(int).value_counts()
        present |= set(counts.index)
        if unlisted := sorted(set(counts.index) - listed):
            raise IngestError(
                f"{path}: holds frames of episodes {unlisted[:10]}{' ...' if len(unlisted) > 10 else ''} that "
                f"{root / 'meta' / 'episodes'} does not list ({len(unlisted)} of {len(unlisted) + len(listed)} "
                "episodes missing from the metadata); regenerate the metadata with LeRobot or delete those episodes")
        for index, count in counts.items():
            if count != lengths[int(index)]:
                raise IngestError(f"{path}: {count} frame rows for episode {index} but meta/episodes says length "
                                  f"{lengths[int(index)]}; the dataset is inconsistent")
        if "task_index" in data.columns:
            if unknown := sorted(set(data["task_index"].astype(int)) - set(tasks["task_index"].astype(int))):
                raise IngestError(f"{path}: task_index {unknown[:10]} not in {root / 'meta' / 'tasks.parquet'}; "
                                  "the tasks table is incomplete, regenerate it with LeRobot")
        check_frame_table(data, path, features)
        total_rows += len(data)
    for index, length in lengths.items():
        if length > 0 and index not in present:
            raise IngestError(f"{root / 'data'}: no frame rows for episode {index} (meta/episodes says {length} "
                              "frames); the dataset is incomplete")
    expected_episodes = info_count(info, "total_episodes", info_path)
    if expected_episodes is not None and expected_episodes != len(episodes):
        raise IngestError(f"{info_path}: total_episodes is {expected_episodes} but {root / 'meta' / 'episodes'} "
                          f"lists {len(episodes)} episodes; fix total_episodes or regenerate the metadata with LeRobot")
    expected_frames = info_count(info, "total_frames", info_path)
    if expected_frames is not None and expected_frames != total_rows:
        raise IngestError(f"{info_path}: total_frames is {expected_frames} but the data files hold {total_rows} "
                          "frames; fix total_frames or regenerate the metadata with LeRobot")


def _keep_episode_ids(root: Path, rows: list[dict]) -> None:
    """A refreshed dataset (flywheel's provenance.parquet at its root) keeps the episode ids its real
    episodes had in the dataset they came from, and a split key when the provenance records one, so their
    train/val/test split never changes between versions; its generated episodes are flagged (they only ever
    train)."""
    path = root / "provenance.parquet"
    if not path.is_file():
        return
    provenance = read_parquet(path).set_index("episode_index")
    for row in rows:
        if row["episode_index"] not in provenance.index:
            raise IngestError(f"{path}: no row for episode {row['episode_index']}; the refreshed dataset is inconsistent")
        entry = provenance.loc[row["episode_index"]]
        row["is_synthetic"] = bool(entry["is_synthetic"])
        if "episode_id" in provenance.columns and isinstance(entry["episode_id"], str):
            row["episode_id"] = entry["episode_id"]
        if "split_key" in provenance.columns and isinstance(entry["split_key"], str) and entry["split_key"]:
            row["split_key"] = entry["split_key"]


def load_episodes(root: Path) -> pd.DataFrame:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise IngestError(f"{root / 'meta' / 'episodes'}: no episode metadata (chunk-*/file-*.parquet); "
                          "the dataset has no episodes or is incomplete")
    episodes = pd.concat([read_parquet(f) for f in files], ignore_index=True)
    required = {"episode_index", "length", "data/chunk_index", "data/file_index"}
    if missing := required - set(episodes.columns):
        raise IngestError(f"{files[0]}: episode metadata lacks columns {sorted(missing)}")
    if episodes.empty:
        raise IngestError(f"{root / 'meta' / 'episodes'}: the dataset has 0 episodes; record or add episodes first")
    return episodes.sort_values("episode_index").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- v2.1


def check_v21(root: Path, config: IngestConfig, report: Progress) -> None:
    """Check a v2.1 dataset before converting it, so errors name its own files (not the converted ones)."""
    info = load_info(root)
    info_path = root / "meta" / "info.json"
    fps = info_fps(info, info_path)
    camera = resolve_camera(info, config.camera_key, info_path)  # fail on a wrong camera before any work
    features = recorded_features(info, config.required_features, info_path)
    for name in ("episodes.jsonl", "tasks.jsonl", "episodes_stats.jsonl"):
        if not (root / "meta" / name).is_file():
            raise IngestError(f"{root / 'meta' / name}: not found; a v2.1 dataset needs it for conversion")
        read_jsonl(root / "meta" / name)  # the converter's own error would not name the file
    tasks = read_jsonl(root / "meta" / "tasks.jsonl")
    if not tasks:
        raise IngestError(f"{root / 'meta' / 'tasks.jsonl'}: lists no tasks; every episode needs its task text "
                          "(the prompt), re-export the dataset with tasks")
    task_indices = {t.get("task_index") for t in tasks}
    episodes = read_jsonl(root / "meta" / "episodes.jsonl")
    if not episodes:
        raise IngestError(f"{root / 'meta' / 'episodes.jsonl'}: the dataset has 0 episodes")
    if (expected := info_count(info, "total_episodes", info_path)) is not None and expected != len(episodes):
        raise IngestError(f"{info_path}: total_episodes is {expected} but meta/episodes.jsonl lists {len(episodes)} "
                          "episodes; fix total_episodes or regenerate the metadata with LeRobot")
    lengths = [int(ep["length"]) for ep in episodes]
    if (expected := info_count(info, "total_frames", info_path)) is not None and expected != sum(lengths):
        raise IngestError(f"{info_path}: total_frames is {expected} but meta/episodes.jsonl's lengths add up to "
                          f"{sum(lengths)}; fix total_frames or regenerate the metadata with LeRobot")
    cameras = video_features(info)
    sizes = {key: camera_size(info, key, info_path) for key in cameras}
    chunks_size = int(info.get("chunks_size", 1000))
    # Every data file present must belong to a listed episode (episodes missing from the metadata).
    listed = {int(ep["episode_index"]) for ep in episodes}
    for data_file in sorted((root / "data").glob("chunk-*/episode_*.parquet")):
        index = int(data_file.stem.rsplit("_", 1)[-1])
        if index not in listed:
            raise IngestError(f"{data_file}: episode {index} is not listed in {root / 'meta' / 'episodes.jsonl'}; "
                              "regenerate the metadata with LeRobot or delete the episode's files")
    report.start("check v2.1 episodes", len(episodes))
    for ep, length in zip(episodes, lengths):
        index = int(ep["episode_index"])
        chunk = index // chunks_size
        data_file = root / info["data_path"].format(episode_chunk=chunk, episode_index=index)
        rows = read_parquet(data_file)
        if len(rows) != length:
            raise IngestError(f"{data_file}: {len(rows)} frame rows but meta/episodes.jsonl says length {length}")
        if "task_index" in rows.columns and (unknown := sorted(set(rows["task_index"].astype(int)) - task_indices)):
            raise IngestError(f"{data_file}: task_index {unknown[:10]} not in {root / 'meta' / 'tasks.jsonl'}; "
                              "the tasks list is incomplete, regenerate it with LeRobot")
        check_frame_table(rows, data_file, features)
        # The converter concatenates every camera, so every camera's file must be there and sound.
        for key in cameras:
            video = root / info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=index)
            if not video.is_file():
                raise IngestError(f"{video}: not found; episode {index} has no {key} video")
            decode_all = config.decode == "all" or key == camera
            scan = scan_video(video, fps, f"{info_path} (fps)", expected_size=sizes[key][0],
                              size_source=sizes[key][1], decode=decode_all)
            start_s = min(scan.times)
            episode_video_hash(scan, start_s, start_s + length / fps, length, f"episode {index}")
            if len(scan.packets) != length:
                raise IngestError(f"{video}: {len(scan.packets)} video frames but meta/episodes.jsonl says episode "
                                  f"{index} has {length}; the video and the metadata disagree")
            if not decode_all:
                check_sample_decodes(video, [(start_s, start_s + length / fps)], fps)
        report.advance(f"episode {index}")


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON lines ({e})") from None


def copy_dataset(source: Path, destination: Path) -> None:
    """Copy a dataset folder without following links: a link is recreated as a link to the same target (made
    absolute, so that it still resolves from the copy), so nothing outside the dataset is copied into the home.
    LeRobot's converter then reads the files it knows through them and writes new ones."""
    for directory, subdirs, files in os.walk(source):  # os.walk lists links to folders but does not enter them
        relative = Path(directory).relative_to(source)
        (destination / relative).mkdir(parents=True, exist_ok=True)
        for name in [*files, *(d for d in subdirs if os.path.islink(os.path.join(directory, d)))]:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                os.symlink(os.path.realpath(path), destination / relative / name)
            else:
                shutil.copy2(path, destination / relative / name)


def convert_v21_to_v30(source: Path, destination: Path) -> None:
    """LeRobot's own converter on a temp copy of `source`; the v3.0 result fills `destination`.

    The converter renames its input to `<name>_old` and puts the result in its place, so it must never
    see the original folder. The copy lives inside `destination` (an ArtifactStore temp dir), so a
    failure anywhere leaves nothing behind. Links in the dataset are copied as links (see copy_dataset);
    the converter's result is checked to hold none.
    """
    from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

    work = destination / ".convert"
    copy = work / source.name
    copy_dataset(source, copy)
    try:
        convert_dataset(repo_id=f"local/{source.name}", root=copy, push_to_hub=False, force_conversion=True)
    except Exception as e:
        raise IngestError(f"{source}: LeRobot's v2.1 -> v3.0 conversion failed ({type(e).__name__}: {e})") from e
    for entry in copy.iterdir():
        shutil.move(str(entry), str(destination / entry.name))
    shutil.rmtree(work)
    if links := sorted(p for p in destination.rglob("*") if p.is_symlink()):
        raise IngestError(f"{source}: the converted dataset would hold a link ({links[0].relative_to(destination)} -> "
                          f"{os.readlink(links[0])}); flywheel never stores links out of a dataset, replace the link "
                          "in the source by the file itself")


# ----------------------------------------------------------------------------------------------- Hub


def download_from_hub(repo_id: str) -> Path:
    """Download a v3.0 dataset (metadata, data, videos) with LeRobotDataset; needs network."""
    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        dataset = LeRobotDataset(repo_id, video_backend="pyav")
    except Exception as e:
        raise IngestError(f"{repo_id}: not a local folder, and downloading it from the Hugging Face Hub failed "
                          f"({type(e).__name__}: {e}); give a local dataset path or go online") from e
    return Path(dataset.root).resolve()
