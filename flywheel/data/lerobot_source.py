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
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from flywheel.data.ingest import IngestError, Progress, check_decodes, episode_video_hash, scan_video

SUPPORTED_VERSIONS = {"v3.0": "lerobot-v3.0", "v2.1": "lerobot-v2.1"}
# Bookkeeping columns that say where an episode sits, not what happened in it.
POSITION_COLUMNS = {"index", "episode_index"}


def load_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise IngestError(f"{path}: not found; a LeRobot dataset root must contain meta/info.json")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IngestError(f"{path}: not valid JSON ({e})") from None
    for field in ("codebase_version", "fps", "features"):
        if field not in info:
            raise IngestError(f"{path}: has no {field!r} field; is this a LeRobot dataset?")
    return info


def lerobot_version(root: Path) -> str:
    """"lerobot-v3.0" or "lerobot-v2.1" from meta/info.json's codebase_version."""
    info = load_info(root)
    version = str(info["codebase_version"])
    if version not in SUPPORTED_VERSIONS:
        raise IngestError(f"{root / 'meta' / 'info.json'}: codebase_version {version!r} is not supported; "
                          f"supported: {', '.join(SUPPORTED_VERSIONS)} (convert older datasets with LeRobot first)")
    return SUPPORTED_VERSIONS[version]


def resolve_camera(info: dict, camera_key: str | None, info_path: Path) -> str:
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    if not cameras:
        raise IngestError(f"{info_path}: the dataset has no video features; ingest needs camera video")
    if camera_key is None:
        return cameras[0]
    if camera_key not in cameras:
        raise IngestError(f"{info_path}: unknown camera_key {camera_key!r}; available: {', '.join(cameras)}")
    return camera_key


def read_parquet(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise IngestError(f"{path}: not found; the dataset is incomplete (copy or download it again)")
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise IngestError(f"{path}: cannot be read as parquet ({e})") from None


def hash_rows(rows: pd.DataFrame) -> str:
    """sha256 of an episode's frame rows, column by column in name order (values, dtype and shape)."""
    digest = hashlib.sha256()
    for name in sorted(c for c in rows.columns if c not in POSITION_COLUMNS):
        column = rows[name]
        values = np.stack(column.to_numpy()) if column.dtype == object and len(column) else column.to_numpy()
        if values.dtype == object:  # strings and other Python objects
            data = json.dumps(values.tolist(), default=str).encode()
        else:
            data = np.ascontiguousarray(values).tobytes()
        digest.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(data)
    return digest.hexdigest()


def episode_task(tasks) -> str:
    tasks = [str(t) for t in (tasks if tasks is not None else [])]
    return "; ".join(tasks)


# ----------------------------------------------------------------------------------------------- v3.0


def read_lerobot_v3(root: Path, camera_key: str | None, dataset_name: str, report: Progress) -> list[dict]:
    """Every episode of a v3.0 dataset as a manifest row (video path relative to `root`), all checked."""
    root = Path(root)
    info = load_info(root)
    info_path = root / "meta" / "info.json"
    if info["codebase_version"] != "v3.0":
        raise IngestError(f"{info_path}: codebase_version is {info['codebase_version']!r}, expected 'v3.0'")
    fps = float(info["fps"])
    camera = resolve_camera(info, camera_key, info_path)
    episodes = load_episodes(root)
    if episodes.empty:
        raise IngestError(f"{root / 'meta' / 'episodes'}: the dataset has 0 episodes; record or add episodes first")
    camera_columns = [f"videos/{camera}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    if missing := [c for c in camera_columns if c not in episodes.columns]:
        raise IngestError(f"{root / 'meta' / 'episodes'}: episode metadata lacks {missing}; the dataset is incomplete")

    video_files = {i: root / info["video_path"].format(
        video_key=camera, chunk_index=int(ep[f"videos/{camera}/chunk_index"]),
        file_index=int(ep[f"videos/{camera}/file_index"])) for i, ep in episodes.iterrows()}
    data_files = {i: root / info["data_path"].format(
        chunk_index=int(ep["data/chunk_index"]), file_index=int(ep["data/file_index"]))
        for i, ep in episodes.iterrows()}
    for path in sorted(set(video_files.values()) | set(data_files.values())):
        if not path.is_file():
            raise IngestError(f"{path}: not found; the dataset is incomplete (copy or download it again)")

    scans = {p: scan_video(p, fps, f"{info_path} (fps)") for p in sorted(set(video_files.values()))}
    frames = {p: read_parquet(p) for p in sorted(set(data_files.values()))}
    rows = []
    report.start("check episodes", len(episodes))
    for i, ep in episodes.iterrows():
        index, length = int(ep["episode_index"]), int(ep["length"])
        what = f"episode {index}"
        data = frames[data_files[i]]
        episode_rows = data[data["episode_index"] == index]
        if len(episode_rows) != length:
            raise IngestError(f"{data_files[i]}: {len(episode_rows)} frame rows for episode {index} but "
                              f"meta/episodes says length {length}; the dataset is inconsistent")
        start_s = float(ep[f"videos/{camera}/from_timestamp"])
        end_s = float(ep[f"videos/{camera}/to_timestamp"])
        video_hash = episode_video_hash(scans[video_files[i]], start_s, end_s, length, what)
        rows.append(dict(
            episode_id=f"{dataset_name}/{index:06d}", episode_index=index, task=episode_task(ep.get("tasks")),
            camera_key=camera, fps=fps, num_frames=length,
            video_relpath=video_files[i].relative_to(root).as_posix(),
            from_timestamp=start_s, to_timestamp=end_s,
            content_hash=hashlib.sha256(f"{hash_rows(episode_rows)}:{video_hash}".encode()).hexdigest(),
        ))
        report.advance(what)
    _keep_episode_ids(root, rows)
    # Decoding every frame would take longer than everything else together; every packet was demuxed
    # above, so decoding each file's first and last used frame proves the codec reads it end to end.
    for path in scans:
        used = [i for i, p in video_files.items() if p == path]
        check_decodes(path, float(episodes.loc[used, f"videos/{camera}/from_timestamp"].min()),
                      float(episodes.loc[used, f"videos/{camera}/to_timestamp"].max()), fps)
    return rows


def _keep_episode_ids(root: Path, rows: list[dict]) -> None:
    """A refreshed dataset (flywheel's provenance.parquet at its root) keeps the episode ids its real
    episodes had in the dataset they came from, so their train/val/test split never changes between
    versions; its generated episodes are flagged (they only ever train)."""
    path = root / "provenance.parquet"
    if not path.is_file():
        return
    provenance = pd.read_parquet(path).set_index("episode_index")
    for row in rows:
        if row["episode_index"] not in provenance.index:
            raise IngestError(f"{path}: no row for episode {row['episode_index']}; the refreshed dataset is inconsistent")
        entry = provenance.loc[row["episode_index"]]
        row["is_synthetic"] = bool(entry["is_synthetic"])
        if "episode_id" in provenance.columns and isinstance(entry["episode_id"], str):
            row["episode_id"] = entry["episode_id"]


def load_episodes(root: Path) -> pd.DataFrame:
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise IngestError(f"{root / 'meta' / 'episodes'}: no episode metadata (chunk-*/file-*.parquet); "
                          "the dataset has no episodes or is incomplete")
    episodes = pd.concat([read_parquet(f) for f in files], ignore_index=True)
    required = {"episode_index", "length", "data/chunk_index", "data/file_index"}
    if missing := required - set(episodes.columns):
        raise IngestError(f"{files[0]}: episode metadata lacks columns {sorted(missing)}")
    return episodes.sort_values("episode_index").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- v2.1


def check_v21(root: Path, camera_key: str | None, report: Progress) -> None:
    """Check a v2.1 dataset before converting it, so errors name its own files (not the converted ones)."""
    info = load_info(root)
    info_path = root / "meta" / "info.json"
    fps = float(info["fps"])
    resolve_camera(info, camera_key, info_path)  # fail on a wrong camera before any work
    cameras = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    for name in ("episodes.jsonl", "tasks.jsonl", "episodes_stats.jsonl"):
        if not (root / "meta" / name).is_file():
            raise IngestError(f"{root / 'meta' / name}: not found; a v2.1 dataset needs it for conversion")
        read_jsonl(root / "meta" / name)  # the converter's own error would not name the file
    episodes = read_jsonl(root / "meta" / "episodes.jsonl")
    if not episodes:
        raise IngestError(f"{root / 'meta' / 'episodes.jsonl'}: the dataset has 0 episodes")
    chunks_size = int(info.get("chunks_size", 1000))
    report.start("check v2.1 episodes", len(episodes))
    for ep in episodes:
        index, length = int(ep["episode_index"]), int(ep["length"])
        chunk = index // chunks_size
        data_file = root / info["data_path"].format(episode_chunk=chunk, episode_index=index)
        rows = read_parquet(data_file)
        if len(rows) != length:
            raise IngestError(f"{data_file}: {len(rows)} frame rows but meta/episodes.jsonl says length {length}")
        # The converter concatenates every camera, so every camera's file must be there and sound.
        for key in cameras:
            video = root / info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=index)
            if not video.is_file():
                raise IngestError(f"{video}: not found; episode {index} has no {key} video")
            scan = scan_video(video, fps, f"{info_path} (fps)")
            start_s = min(scan.times)
            episode_video_hash(scan, start_s, start_s + length / fps, length, f"episode {index}")
            if len(scan.packets) != length:
                raise IngestError(f"{video}: {len(scan.packets)} video frames but meta/episodes.jsonl says episode "
                                  f"{index} has {length}; the video and the metadata disagree")
        report.advance(f"episode {index}")


def read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: not valid JSON lines ({e})") from None


def convert_v21_to_v30(source: Path, destination: Path) -> None:
    """LeRobot's own converter on a temp copy of `source`; the v3.0 result fills `destination`.

    The converter renames its input to `<name>_old` and puts the result in its place, so it must never
    see the original folder. The copy lives inside `destination` (an ArtifactStore temp dir), so a
    failure anywhere leaves nothing behind.
    """
    from lerobot.scripts.convert_dataset_v21_to_v30 import convert_dataset

    work = destination / ".convert"
    copy = work / source.name
    shutil.copytree(source, copy, symlinks=False)
    try:
        convert_dataset(repo_id=f"local/{source.name}", root=copy, push_to_hub=False, force_conversion=True)
    except Exception as e:
        raise IngestError(f"{source}: LeRobot's v2.1 -> v3.0 conversion failed ({type(e).__name__}: {e})") from e
    for entry in copy.iterdir():
        shutil.move(str(entry), str(destination / entry.name))
    shutil.rmtree(work)


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
