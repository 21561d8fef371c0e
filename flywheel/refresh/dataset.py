"""Fold accepted synthetic episodes into a new, immutable version of a LeRobot v3.0 dataset.

New version = the base dataset's episodes (untouched bytes: data rewritten with one more column, videos
copied) + the synthetic episodes, with the same features plus a per-frame `is_synthetic`, and a provenance
file. Built only with LeRobot's own API: `add_features` (flag the real episodes), `LeRobotDataset.create`
+ `add_frame`/`save_episode`/`finalize` (the synthetic episodes), `aggregate_datasets` (merge, one video
file per source file, so codecs never have to match). Written inside an ArtifactStore temp dir and renamed
into `<home>/datasets/<version id>` when complete: a crash leaves no version behind.

LeRobot's own tools accept every version: each part's meta/info.json describes its features exactly as the
base dataset's does (whatever form that takes, e.g. the per-feature `fps` of a dataset converted from
v2.1; LeRobot's writers would otherwise restate them their own way, and `aggregate_datasets` refuses to
merge datasets whose descriptions differ), plus `is_synthetic`; and `is_synthetic` has stats over all
frames (per episode and in meta/stats.json), also when no synthetic episode was added; per-episode stats
keep the base's set of statistics (LeRobot 0.6 adds quantiles that a converted v2.1 dataset lacks, and
`aggregate_datasets` cannot write the mixture a second time). A version merges
with LeRobot's `aggregate_datasets` / `merge_datasets` with the other versions of its lineage, and with
its source dataset once `add_is_synthetic` has given the source the flag (all False).

Version id = content hash of the inputs: the base dataset's files, every synthetic episode's frames,
actions, fps and provenance, and the config. The same inputs give the same version (written once).

Synthetic clips are brought to the dataset's frame rate (nearest frame per dataset timestamp; actions
linearly interpolated) and frame size (bilinear resize) before they are written. Clips generated from
aspect-keeping "pad" clips (`clip_resize="pad"`, flywheel.data.clips) give only their picture, without the
bars, to that resize: the camera's geometry comes back undistorted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flywheel.errors import DataError, IntegrityError
from flywheel.label.episodes import dataset_info
from flywheel.label.labeling import nearest_indices, resample_actions
from flywheel.refresh.config import RefreshConfig
from flywheel.refresh.provenance import provenance_table, read_provenance, write_provenance
from flywheel.store import ArtifactStore, atomic_write_bytes, hash_bytes, hash_json, hash_tree, short

KIND = "datasets"
SYNTHETIC_FLAG = "is_synthetic"
FLAG_FEATURE = {"dtype": "bool", "shape": (1,), "names": None}
DEFAULT_FEATURES = {"timestamp", "frame_index", "episode_index", "index", "task_index"}


@dataclass
class SyntheticEpisode:
    """An accepted generated clip: frames uint8 [T,H,W,3] and pseudo-actions [T,D] at `fps`."""

    frames: np.ndarray
    actions: np.ndarray
    fps: float
    provenance: dict                       # clip_id, adapter_version, seed, prompt, source_episode, filter_scores
    task: str | None = None                # default: the base dataset's first task
    features: dict[str, np.ndarray] = field(default_factory=dict)  # other per-frame features, [T, ...] at fps

    def content_hash(self) -> str:
        # Not the filter scores: they record why the clip was accepted, and OpenCV's optical flow and the
        # simulator differ in their last bits between runs, so a score on a rounding boundary changed the
        # version id between two checkouts (unexplained_change 0.515131 vs 0.515132) with identical data.
        recorded = {k: v for k, v in self.provenance.items() if k != "filter_scores"}
        parts = [hash_bytes(np.ascontiguousarray(self.frames).tobytes()), hash_bytes(np.ascontiguousarray(
            self.actions, dtype=np.float32).tobytes()), str(self.fps), hash_json(recorded), str(self.task),
            *[f"{k}:{hash_bytes(np.ascontiguousarray(v).tobytes())}" for k, v in sorted(self.features.items())]]
        return hash_json(parts)


def version_id(base_root: str | Path, episodes: list[SyntheticEpisode], config: RefreshConfig,
               clip_resize: str | None = None) -> str:
    return short(hash_json({"base": hash_tree(base_root), "episodes": [e.content_hash() for e in episodes],
                            "config": config.model_dump(),
                            **({"clip_resize": clip_resize} if clip_resize not in (None, "stretch") else {})}), 16)


def refresh_dataset(base_root: str | Path, episodes: list[SyntheticEpisode], store: ArtifactStore,
                    config: RefreshConfig | None = None,
                    progress: Callable[[dict], None] | None = None,
                    base_episode_ids: list[str] | None = None,
                    clip_resize: str | None = None) -> tuple[str, Path]:
    """Write (or find) the new dataset version; returns (version id, dataset root). `base_episode_ids`
    (the ingest manifest's, by episode_index) go into the provenance, so ingesting the new version keeps
    every real episode's id and split. `clip_resize`: the clips stage's `resize` for the clips the episodes
    were generated from (None: the frames are the scene, stretched to the camera's size)."""
    config = config or RefreshConfig()
    base_root = Path(base_root)
    info = dataset_info(base_root)
    camera = _camera(info, config, base_root)
    for i, ep in enumerate(episodes):
        _check_episode(i, ep, info, camera, config)
    vid = version_id(base_root, episodes, config, clip_resize)
    if store.exists(KIND, vid):
        return vid, store.path(KIND, vid)
    meta = {"base_root": str(base_root), "num_synthetic": len(episodes), "config": config.model_dump()}
    with store.write(KIND, vid, meta) as tmp, quiet_encoders():
        build = tmp / "_build"
        real = _flagged_base(base_root, info, build / "real", config)
        features = dataset_info(real)["features"]  # the base's own descriptions + is_synthetic
        synth = _write_synthetic(base_root, info, camera, episodes, build / "synthetic", config, progress, clip_resize)
        if synth is not None:
            carry_feature_definitions(synth, features)
            align_episode_stats(synth, episode_stat_names(real))
        out = build / "out"
        _aggregate([real, synth] if synth is not None else [real], out, config)
        carry_feature_definitions(out, features)
        check_flag_stats(out)
        for child in out.iterdir():
            shutil.move(str(child), str(tmp / child.name))
        num_real = json.loads((real / "meta" / "info.json").read_text())["total_episodes"]
        shutil.rmtree(build)
        _carry_sidecars(base_root, tmp)
        table = provenance_table(num_real, [e.provenance for e in episodes], read_provenance(base_root),
                                 base_episode_ids, vid)
        write_provenance(tmp, table, {"version_id": vid, "base_root": str(base_root),
                                      "base_tree_hash": hash_tree(base_root), "num_real_episodes": num_real,
                                      "num_synthetic_episodes": len(episodes), "config": config.model_dump()})
    return vid, store.path(KIND, vid)


def _camera(info: dict, config: RefreshConfig, root: Path) -> str:
    cams = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    if config.camera_key is not None:
        if config.camera_key not in cams:
            raise DataError(f"{root}: camera_key {config.camera_key!r} is not a video feature; one of {cams}")
        return config.camera_key
    if len(cams) != 1:
        raise DataError(f"{root}: dataset has cameras {cams}; synthetic clips carry one view, and refresh can only "
                         "fold them into a single-camera dataset (set camera_key and provide the others as features)")
    return cams[0]


def _numeric_features(info: dict, camera: str) -> dict[str, dict]:
    return {k: f for k, f in info["features"].items()
            if k not in DEFAULT_FEATURES and k != camera and k != SYNTHETIC_FLAG and f.get("dtype") != "video"}


def _check_episode(i: int, ep: SyntheticEpisode, info: dict, camera: str, config: RefreshConfig) -> None:
    where = f"synthetic episode {i} ({ep.provenance.get('clip_id', '?')})"
    frames = np.asarray(ep.frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise DataError(f"{where}: frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    action_shape = tuple(info["features"]["action"]["shape"])
    if np.asarray(ep.actions).shape != (len(frames), *action_shape):
        raise DataError(f"{where}: actions shape {np.asarray(ep.actions).shape} != ({len(frames)}, *{action_shape}); "
                         "one action per frame, as label_video returns")
    if not np.isfinite(ep.actions).all():
        raise DataError(f"{where}: actions contain NaN/inf; reject the clip or fix the labels")
    for key, feat in _numeric_features(info, camera).items():
        if key == "action" or key in ep.features:
            continue
        if key == "observation.state" and config.state_from_actions and tuple(feat["shape"]) == action_shape:
            continue
        raise DataError(f"{where}: the dataset has feature {key!r} {feat['shape']} and the clip has no value for it; "
                         f"pass it in SyntheticEpisode.features (e.g. from a simulator replay)")


def _carry_sidecars(base_root: Path, dst: Path) -> None:
    """Files next to LeRobot's own metadata that describe the base's real episodes by index (the real episodes
    keep their indices in the new version): for a domain recorded in a simulator, its record of them (the
    PushT sample's reset states), which the replay of the next iteration's synthetic clips starts from."""
    from flywheel.simulation import simulation_for

    simulation = simulation_for(base_root)
    for name in simulation.sidecar_files if simulation is not None else ():
        if (base_root / name).is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base_root / name, dst / name)


def _flagged_base(base_root: Path, info: dict, dst: Path, config: RefreshConfig) -> Path:
    """The base dataset with `is_synthetic` = False on every frame (or as it is, if it has the flag)."""
    if SYNTHETIC_FLAG in info["features"]:
        return base_root
    return _add_false_flag(base_root, dst, config.repo_id + "_real")


def add_is_synthetic(source_root: str | Path, out_root: str | Path,
                     repo_id: str = "flywheel/with_is_synthetic") -> Path:
    """A copy of a LeRobot v3.0 dataset at `out_root` (must not exist) with `is_synthetic` = False on every
    frame, its stats included, and every other feature described exactly as in the source: what LeRobot's
    `aggregate_datasets` / `merge_datasets` need to merge the source with a refreshed version of it.

        add_is_synthetic("datasets/g1_pick_bottle", "/tmp/g1_flagged")
        merge_datasets([LeRobotDataset("a", root="/tmp/g1_flagged"), load_refreshed(version_root)], "merged", out)
    """
    source_root, out_root = Path(source_root), Path(out_root)
    info = dataset_info(source_root)
    if SYNTHETIC_FLAG in info["features"]:
        raise DataError(f"{source_root / 'meta' / 'info.json'}: already has an {SYNTHETIC_FLAG!r} feature; "
                        "it merges with refreshed versions as it is")
    if out_root.exists():
        raise DataError(f"{out_root}: already exists; add_is_synthetic writes a new dataset, give a new path")
    with quiet_encoders():
        _add_false_flag(source_root, out_root, repo_id)
    return out_root


def _add_false_flag(source_root: Path, dst: Path, repo_id: str) -> Path:
    """LeRobot's `add_features` with an all-False flag, then the source's own feature descriptions and
    the flag's stats (add_features writes neither)."""
    from lerobot.datasets.dataset_tools import add_features
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    info = dataset_info(source_root)
    source = LeRobotDataset(repo_id + "_source", root=source_root, video_backend="pyav")
    flags = np.zeros((info["total_frames"], 1), dtype=bool)
    # add_features opens its output without a video backend, so LeRobot probes torchcodec and logs its whole
    # native-library traceback before falling back to PyAV; nothing here decodes video, flywheel always uses PyAV.
    with _quiet_logger("lerobot.utils.import_utils"):
        add_features(source, {SYNTHETIC_FLAG: (flags, dict(FLAG_FEATURE))}, output_dir=dst, repo_id=repo_id)
    carry_feature_definitions(dst, {**info["features"], SYNTHETIC_FLAG: _flag_definition()})
    _write_flag_stats(dst, value=False, stat_names=episode_stat_names(source_root))
    return dst


def _flag_definition() -> dict:
    return json.loads(json.dumps(FLAG_FEATURE))  # as info.json states it (shape a list)


def carry_feature_definitions(root: Path, features: dict) -> None:
    """Rewrite `root`'s meta/info.json so that every feature reads exactly as in `features` (same keys,
    order, entries), keeping only the dataset's own video encoder settings (which LeRobot ignores when it
    compares features, and merges when it aggregates)."""
    from lerobot.configs import VIDEO_ENCODER_INFO_KEYS

    path = root / "meta" / "info.json"
    info = json.loads(path.read_text())
    own = info["features"]
    if set(own) != set(features):
        raise IntegrityError(f"{path}: features {sorted(own)} differ from the base dataset's {sorted(features)}")
    carried = {}
    for key, feature in features.items():
        feature = json.loads(json.dumps(feature))
        if feature.get("dtype") == "video":
            encoder = {k: v for k, v in (own[key].get("info") or {}).items() if k in VIDEO_ENCODER_INFO_KEYS}
            feature["info"] = {**(feature.get("info") or {}), **encoder}
        carried[key] = feature
    info["features"] = carried
    atomic_write_bytes(path, json.dumps(info, indent=4).encode())


def episode_stat_names(root: Path) -> set[str] | None:
    """The statistics (min, max, mean, std, count, q01, ...) a dataset keeps per episode; None when it keeps none."""
    import pyarrow.parquet as pq

    names = {c.rsplit("/", 1)[-1] for path in sorted((root / "meta" / "episodes").glob("*/*.parquet"))
             for c in pq.read_schema(path).names if c.startswith("stats/")}
    return names or None


def align_episode_stats(root: Path, stat_names: set[str] | None) -> None:
    """Keep only the per-episode statistics the base dataset keeps. LeRobot 0.6's writer adds quantiles
    (q01..q99) that a dataset converted from v2.1 does not have; episodes with and without them cannot be
    merged again by `aggregate_datasets` (pyarrow cannot write the mixed column)."""
    import pyarrow.parquet as pq

    if stat_names is None:
        return
    for path in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        table = pq.read_table(path)
        extra = [c for c in table.column_names if c.startswith("stats/") and c.rsplit("/", 1)[-1] not in stat_names]
        if extra:
            _write_table(table.drop_columns(extra), path)


def _write_table(table, path: Path) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def _write_flag_stats(root: Path, value: bool, stat_names: set[str] | None) -> None:
    """Per-episode and dataset stats of a constant `is_synthetic`, computed by LeRobot's own functions and
    stored the way LeRobot stores them (episode parquet columns `stats/is_synthetic/<stat>` typed as its
    writer types them, meta/stats.json), limited to the statistics the dataset keeps for its other features."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lerobot.datasets.compute_stats import aggregate_stats, compute_episode_stats
    from lerobot.datasets.io_utils import load_stats, write_stats

    def kept(stats: dict) -> dict:
        return {k: v for k, v in stats.items() if stat_names is None or k in stat_names}

    feature = {SYNTHETIC_FLAG: dict(FLAG_FEATURE)}
    episode_stats = []
    for path in sorted((root / "meta" / "episodes").glob("*/*.parquet")):
        table = pq.read_table(path)
        per_episode = [
            kept(compute_episode_stats({SYNTHETIC_FLAG: np.full((int(n), 1), value)}, feature)[SYNTHETIC_FLAG])
            for n in table.column("length").to_pylist()]
        episode_stats.extend({SYNTHETIC_FLAG: e} for e in per_episode)
        for stat in per_episode[0]:
            kind = pa.int64() if stat == "count" else pa.float64()
            values = [np.asarray(e[stat], dtype=np.int64 if stat == "count" else np.float64).ravel().tolist()
                      for e in per_episode]
            table = table.append_column(f"stats/{SYNTHETIC_FLAG}/{stat}", pa.array(values, pa.list_(kind)))
        _write_table(table, path)
    stats = load_stats(root) or {}
    stats[SYNTHETIC_FLAG] = kept(aggregate_stats(episode_stats)[SYNTHETIC_FLAG])
    write_stats(stats, root)


def check_flag_stats(root: Path) -> None:
    """`is_synthetic`'s stats in meta/stats.json count every frame and average to the synthetic share."""
    import pandas as pd
    from lerobot.datasets.io_utils import load_stats

    files = sorted((root / "data").glob("*/*.parquet"))
    frames = pd.concat([pd.read_parquet(p, columns=[SYNTHETIC_FLAG]) for p in files])
    stats = (load_stats(root) or {}).get(SYNTHETIC_FLAG)
    truth = frames[SYNTHETIC_FLAG].to_numpy(dtype=float)
    if stats is None or int(np.asarray(stats["count"]).item()) != len(truth) or \
            not np.isclose(float(np.asarray(stats["mean"]).item()), truth.mean()):
        raise IntegrityError(f"{root / 'meta' / 'stats.json'}: {SYNTHETIC_FLAG} stats {stats} do not describe the "
                             f"{len(truth)} frames ({int(truth.sum())} synthetic); the base dataset's stats lack the "
                             "flag (refresh from a dataset that add_is_synthetic or refresh_dataset wrote)")


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# SVT-AV1 (LeRobot's default encoder) prints its whole configuration block to stderr on every encoder it
# opens, at its default level "info"; neither FFmpeg's libsvtav1 wrapper nor svtav1-params has a switch for
# it. The library reads its level from $SVT_LOG each time an encoder is initialised: 1 keeps errors.
SVT_LOG_LEVEL_ERRORS = "1"


@contextlib.contextmanager
def quiet_encoders():
    """While LeRobot encodes: SVT-AV1 at level error ($SVT_LOG), FFmpeg at ERROR (LeRobot's muxing would
    print the mp4 muxer's notes). Afterwards both as they were: LeRobot's video encoder ends with
    `av.logging.restore_default_callback()`, which hands FFmpeg's logging back to FFmpeg, so every later
    encode in this process (the next iteration's clips) would print x264's statistics; PyAV's level is put
    back."""
    import av.logging

    level = av.logging.get_level()
    svt = os.environ.get("SVT_LOG")
    av.logging.set_libav_level(av.logging.ERROR)
    os.environ["SVT_LOG"] = SVT_LOG_LEVEL_ERRORS
    try:
        yield
    finally:
        av.logging.set_level(level)
        if svt is None:
            os.environ.pop("SVT_LOG", None)
        else:
            os.environ["SVT_LOG"] = svt


def _frames_for_dataset(ep: SyntheticEpisode, fps: int, hw: tuple[int, int], clip_resize: str | None):
    from flywheel.data.clips import content_box, restore_frames

    idx = nearest_indices(len(ep.frames), ep.fps, fps)
    frames = np.asarray(ep.frames)[idx]
    # The part of the generated frame that shows the scene: where the clips it was generated from put the camera.
    box = content_box(*hw, frames.shape[1], frames.shape[2], clip_resize or "stretch")
    frames = restore_frames(frames, box, *hw)
    actions = resample_actions(ep.actions, ep.fps, fps, len(idx))
    extras = {k: resample_actions(v, ep.fps, fps, len(idx)) for k, v in ep.features.items()}
    return frames, actions, extras


def _write_synthetic(base_root: Path, info: dict, camera: str, episodes: list[SyntheticEpisode], dst: Path,
                     config: RefreshConfig, progress, clip_resize: str | None) -> Path | None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    import pandas as pd

    if not episodes:
        return None
    features = {k: dict(f, shape=tuple(f["shape"])) for k, f in info["features"].items() if k not in DEFAULT_FEATURES}
    features[SYNTHETIC_FLAG] = dict(FLAG_FEATURE)
    tasks = pd.read_parquet(base_root / "meta" / "tasks.parquet")
    default_task = str(tasks.index[0]) if "task_index" in tasks.columns else str(tasks.iloc[0, 0])
    hw = tuple(info["features"][camera]["shape"][:2])
    ds = LeRobotDataset.create(config.repo_id + "_synthetic", fps=int(info["fps"]), features=features, root=dst,
                               robot_type=info.get("robot_type"), use_videos=True, video_backend="pyav")
    numeric = _numeric_features(info, camera)
    try:
        _add_episodes(ds, camera, episodes, info, numeric, default_task, hw, progress, clip_resize)
    except BaseException:
        # Close LeRobot's writer now: left open, it flushes buffered metadata when garbage-collected,
        # i.e. after the failed artifact's temp dir was removed, leaving a stray directory behind.
        with contextlib.suppress(Exception):
            ds.finalize()
        raise
    ds.finalize()
    return dst


def _add_episodes(ds, camera: str, episodes: list[SyntheticEpisode], info: dict, numeric: dict, default_task: str,
                  hw: tuple[int, int], progress, clip_resize: str | None) -> None:
    for i, ep in enumerate(episodes):
        frames, actions, extras = _frames_for_dataset(ep, int(info["fps"]), hw, clip_resize)
        if "observation.state" in numeric and "observation.state" not in extras:
            # Pseudo-state: where the previous command sent the robot (documented in RefreshConfig).
            extras["observation.state"] = np.concatenate([actions[:1], actions[:-1]])
        for t in range(len(frames)):
            frame = {camera: frames[t], "action": actions[t].astype(np.float32), "task": ep.task or default_task,
                     SYNTHETIC_FLAG: np.array([True])}
            for key in numeric:
                if key != "action":
                    frame[key] = np.asarray(extras[key][t], dtype=np.float32)
            ds.add_frame(frame)
        ds.save_episode()
        if progress is not None:
            progress(dict(stage="refresh", episode=i + 1, total=len(episodes)))


def _aggregate(roots: list[Path], out: Path, config: RefreshConfig) -> None:
    from lerobot.datasets.aggregate import aggregate_datasets

    # LeRobot logs a warning per differing encoder setting; they are expected (real AV1 + synthetic encodes).
    with _quiet_logger("lerobot.datasets.aggregate"):
        aggregate_datasets(repo_ids=[f"{config.repo_id}_part{i}" for i in range(len(roots))],
                           aggr_repo_id=config.repo_id, roots=roots, aggr_root=out, concatenate_videos=False)


def load_refreshed(root: str | Path, repo_id: str = "flywheel/refreshed"):
    """The refreshed dataset through LeRobot, offline, decoding with PyAV."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(repo_id, root=root, video_backend="pyav")
