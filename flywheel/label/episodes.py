"""Real episodes in, at a small fixed resolution: frames + actions per episode of a LeRobot v3.0 dataset.

The IDM, the filter calibration and the usefulness report all read real episodes the same way:
the camera video decoded with PyAV (`flywheel.data.video.read_frames`), each frame resized to a square
`image_size`, plus the per-frame `action` (and any other numeric features) from the parquet data.
Decoded, resized episodes can be cached as .npz in a directory, so tests and repeated runs decode once.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flywheel.data.video import read_frames
from flywheel.store import atomic_write_bytes, hash_file, hash_json


@dataclass
class Episode:
    """One episode: frames uint8 [T, S, S, 3] and actions float32 [T, D] at `fps`."""

    index: int
    frames: np.ndarray
    actions: np.ndarray
    fps: float
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frames)


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Squash every frame to size x size (bilinear, antialiased). Aspect ratio is not kept, on purpose:
    real (e.g. 480x640) and generated (e.g. 64x64) frames must land on the same grid."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T,H,W,3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames])


def dataset_info(root: str | Path) -> dict:
    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{root}: not a LeRobot v3.0 dataset (no meta/info.json); point at the dataset root")
    info = json.loads(info_path.read_text())
    if info.get("codebase_version") != "v3.0":
        raise ValueError(f"{info_path}: codebase_version {info.get('codebase_version')!r}; convert the dataset to v3.0 first")
    return info


def camera_keys(info: dict) -> list[str]:
    return [k for k, f in info["features"].items() if f.get("dtype") == "video"]


def _episode_table(root: Path) -> pd.DataFrame:
    files = sorted((root / "meta" / "episodes").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}/meta/episodes: no episode metadata parquet files")
    return pd.concat([pd.read_parquet(f) for f in files]).set_index("episode_index").sort_index()


def _data_table(root: Path, columns: list[str]) -> pd.DataFrame:
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root}/data: no data parquet files")
    return pd.concat([pd.read_parquet(f, columns=columns) for f in files]).sort_values("index")


def recorded_column(root: str | Path, episode_index: int, column: str) -> np.ndarray:
    """One per-frame column of one episode, [T, D] in frame order (empty when the episode has no frames)."""
    table = _data_table(Path(root), ["index", "episode_index", "frame_index", column])
    rows = table[table["episode_index"] == episode_index].sort_values("frame_index")
    return np.stack(rows[column].to_numpy()) if len(rows) else np.zeros((0, 0), np.float32)


def recorded_actions(root: str | Path, episode_index: int) -> np.ndarray:
    return recorded_column(root, episode_index, "action")


def list_episodes(root: str | Path) -> list[int]:
    return [int(i) for i in _episode_table(Path(root)).index]


def load_episodes(
    root: str | Path,
    episodes: list[int] | None = None,
    image_size: int = 64,
    camera_key: str | None = None,
    action_key: str = "action",
    extra_keys: tuple[str, ...] = (),
    cache_dir: str | Path | None = None,
) -> list[Episode]:
    """Decode `episodes` (default: all) of the dataset at `root`, frames resized to image_size."""
    root = Path(root)
    info = dataset_info(root)
    cams = camera_keys(info)
    if not cams:
        raise ValueError(f"{root}: the dataset has no video feature; the IDM needs a camera")
    camera_key = camera_key or cams[0]
    if camera_key not in cams:
        raise ValueError(f"{root}: camera_key {camera_key!r} is not a video feature; choose one of {cams}")
    for key in (action_key, *extra_keys):
        if key not in info["features"]:
            raise ValueError(f"{root}: feature {key!r} not in meta/info.json features {sorted(info['features'])}")
    table = _episode_table(root)
    wanted = list(table.index) if episodes is None else list(episodes)
    unknown = sorted(set(wanted) - set(table.index))
    if unknown:
        raise ValueError(f"{root}: episodes {unknown} do not exist; the dataset has {len(table)} episodes")

    cache_key = None
    if cache_dir is not None:
        ep_meta_hashes = [hash_file(f) for f in sorted((root / "meta" / "episodes").rglob("*.parquet"))]
        cache_key = hash_json(dict(info=info, ep=ep_meta_hashes, size=image_size, cam=camera_key,
                                   action=action_key, extras=list(extra_keys)))[:16]
    data = None
    out = []
    for ep in wanted:
        cached = Path(cache_dir) / f"{cache_key}-{ep}.npz" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            z = np.load(cached)
            out.append(Episode(int(ep), z["frames"], z["actions"], float(info["fps"]),
                               {k: z[f"extra/{k}"] for k in extra_keys}))
            continue
        if data is None:
            data = _data_table(root, ["index", "episode_index", action_key, *extra_keys])
        row = table.loc[ep]
        rows = data[data["episode_index"] == ep]
        actions = np.stack(rows[action_key].to_numpy()).astype(np.float32)
        video = root / info["video_path"].format(video_key=camera_key,
                                                 chunk_index=int(row[f"videos/{camera_key}/chunk_index"]),
                                                 file_index=int(row[f"videos/{camera_key}/file_index"]))
        frames = read_frames(video, float(row[f"videos/{camera_key}/from_timestamp"]),
                             float(row[f"videos/{camera_key}/to_timestamp"]))
        n = min(len(frames), len(actions))
        if abs(len(frames) - len(actions)) > 2:
            raise ValueError(f"{video}: episode {ep} has {len(frames)} video frames but {len(actions)} data rows")
        episode = Episode(int(ep), resize_frames(frames[:n], image_size), actions[:n], float(info["fps"]),
                          {k: np.stack(rows[k].to_numpy()).astype(np.float32)[:n] for k in extra_keys})
        if cached is not None:
            import io

            buf = io.BytesIO()
            np.savez(buf, frames=episode.frames, actions=episode.actions,
                     **{f"extra/{k}": v for k, v in episode.extras.items()})
            atomic_write_bytes(cached, buf.getvalue())
        out.append(episode)
    return out


def load_actions(root: str | Path, episodes: list[int] | None = None, action_key: str = "action") -> list[Episode]:
    """Episodes with their actions only (no video decoded; frames is empty): cheap real-data statistics."""
    root = Path(root)
    info = dataset_info(root)
    if action_key not in info["features"]:
        raise ValueError(f"{root}: feature {action_key!r} not in meta/info.json features {sorted(info['features'])}")
    data = _data_table(root, ["index", "episode_index", action_key])
    wanted = sorted(set(data["episode_index"])) if episodes is None else list(episodes)
    out = []
    for ep in wanted:
        rows = data[data["episode_index"] == ep]
        if rows.empty:
            raise ValueError(f"{root}: episode {ep} has no data rows")
        out.append(Episode(int(ep), np.zeros((0, 0, 0, 3), np.uint8), np.stack(rows[action_key].to_numpy()).astype(np.float32),
                           float(info["fps"])))
    return out


def codec_rendered(episode: Episode, codec: Callable[[list[np.ndarray]], list[np.ndarray]], clip_frames: int,
                   clip_fps: float) -> Episode:
    """The episode as the world model would show it: resampled to the generator's clip fps, cut into clips of
    `clip_frames` (the last one aligned to the end), each round-tripped through `codec` (a list of clips ->
    the decoded clips), then read back at the episode's own timestamps. Actions are the episode's."""
    from flywheel.label.labeling import nearest_indices

    at_clip_fps = nearest_indices(len(episode), episode.fps, clip_fps)
    frames = episode.frames[at_clip_fps]
    if len(frames) < clip_frames:
        raise ValueError(f"episode {episode.index}: {len(frames)} frames at {clip_fps:g} fps, shorter than one "
                         f"{clip_frames}-frame clip; it cannot be rendered by the codec")
    starts = list(range(0, len(frames) - clip_frames + 1, clip_frames))
    if starts[-1] + clip_frames < len(frames):
        starts.append(len(frames) - clip_frames)
    rendered = np.empty_like(frames)
    for s, clip in zip(starts, codec([frames[s:s + clip_frames] for s in starts])):
        rendered[s:s + clip_frames] = clip
    back = np.clip(np.rint(np.arange(len(episode)) / episode.fps * clip_fps).astype(int), 0, len(frames) - 1)
    return dataclasses.replace(episode, frames=rendered[back])
