"""The episode manifest: one row per demonstration episode, the contract between ingest and later stages.

Artifact layout, `<home>/manifests/<key>/`:
  manifest.parquet  one row per episode, columns MANIFEST_COLUMNS (below), sorted by episode_index
  manifest.json     the summary: episodes, frames, per-split counts, source, fps, camera_key, tasks,
                    plus the inputs' content hashes and the ingest config that made the key

A row says where an episode's frames are: `video_path` between `from_timestamp` and `to_timestamp`
seconds (LeRobot v3.0 packs many episodes into one mp4; a raw video holds one episode from 0 s).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

MANIFEST_FILE = "manifest.parquet"
SUMMARY_FILE = "manifest.json"

# name -> pandas dtype; the order is the column order on disk.
MANIFEST_COLUMNS: dict[str, str] = {
    "episode_id": "object",      # "<dataset name>/<episode_index:06d>" or "<raw folder>/<video stem>"; stable
    "episode_index": "int64",
    "task": "object",            # the episode's task; for raw videos the caption
    "camera_key": "object",      # LeRobot video feature key; "video" for raw folders
    "fps": "float64",
    "num_frames": "int64",
    "source": "object",          # "lerobot-v3.0" | "lerobot-v2.1" | "raw-videos"
    "dataset_root": "object",    # absolute path of the v3.0 root actually read (or the raw folder)
    "video_path": "object",      # absolute
    "from_timestamp": "float64",  # seconds within video_path
    "to_timestamp": "float64",
    "content_hash": "object",    # sha256 of the episode's data rows + video packets (raw: video file + caption)
    "split_key": "object",       # what decides the split: a hash of the recorded frames (flywheel.data.splits)
    "split": "object",           # "train" | "val" | "test"
    "is_synthetic": "bool",      # a generated episode of a refreshed dataset (always in the train split)
}


@dataclasses.dataclass
class Manifest:
    path: Path              # the artifact directory <home>/manifests/<key>
    key: str
    frame: pd.DataFrame     # columns MANIFEST_COLUMNS
    summary: dict[str, Any]

    def split(self, name: str) -> pd.DataFrame:
        """The rows of one split ("train" | "val" | "test")."""
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """Counts a person (or a Dagster asset page) wants to see at a glance."""
    fps_values = sorted(set(frame["fps"].tolist()))
    return {
        "episodes": int(len(frame)),
        "frames": int(frame["num_frames"].sum()),
        "splits": {s: int((frame["split"] == s).sum()) for s in ("train", "val", "test")},
        "split_frames": {s: int(frame.loc[frame["split"] == s, "num_frames"].sum()) for s in ("train", "val", "test")},
        "source": str(frame["source"].iloc[0]),
        "fps": fps_values[0] if len(fps_values) == 1 else fps_values,
        "camera_key": str(frame["camera_key"].iloc[0]),
        "tasks": sorted(set(frame["task"].tolist())),
        "dataset_root": str(frame["dataset_root"].iloc[0]),
    }


def as_manifest_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> a frame with exactly the contract's columns, dtypes and order."""
    frame = pd.DataFrame(rows)
    if "is_synthetic" not in frame.columns:  # only a refreshed dataset's provenance says otherwise
        frame["is_synthetic"] = False
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"manifest rows lack columns {missing}")
    frame = frame[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    return frame.sort_values("episode_index", kind="stable").reset_index(drop=True)


def write_manifest(directory: str | os.PathLike, frame: pd.DataFrame, summary: dict[str, Any]) -> None:
    """Write into a (temp) artifact directory; the ArtifactStore makes it visible atomically."""
    directory = Path(directory)
    frame.to_parquet(directory / MANIFEST_FILE, index=False)
    (directory / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")


def load_manifest(path_or_dir: str | os.PathLike) -> Manifest:
    """Read a manifest artifact: its directory, or the manifest.parquet / manifest.json inside it."""
    path = Path(path_or_dir)
    directory = path.parent if path.name in (MANIFEST_FILE, SUMMARY_FILE) else path
    table = directory / MANIFEST_FILE
    if not table.is_file():
        raise FileNotFoundError(f"{table}: no episode manifest here; run the ingest stage to create one")
    frame = pd.read_parquet(table)
    if "split_key" not in frame.columns and "split" in frame.columns:
        # Written before splits followed content (schema < 3): its split came from the episode id.
        frame.insert(list(frame.columns).index("split"), "split_key", frame.get("episode_id"))
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{table}: not an episode manifest, columns {missing} are missing")
    summary_file = directory / SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else summarize(frame)
    return Manifest(path=directory, key=directory.name, frame=frame, summary=summary)
