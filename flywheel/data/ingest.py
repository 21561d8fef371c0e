"""Ingest: demonstrations in (LeRobot v3.0, LeRobot v2.1, or a raw video folder) -> an episode manifest.

    manifest = ingest(IngestConfig(source="datasets/g1_pick_bottle"), ArtifactStore(home))

Inputs:
  lerobot-v3.0  a LeRobot v3.0 dataset root (or a Hub repo id, downloaded with LeRobotDataset when online)
  lerobot-v2.1  a LeRobot v2.1 dataset: converted once, on a temp copy, with LeRobot's own
                v2.1 -> v3.0 converter into the artifact `<home>/datasets/<key>` (key = content hash of the
                v2.1 input), then read as v3.0
  raw-videos    `videos/<stem>.mp4` + `metas/<stem>.txt` captions (the diffusers Cosmos LoRA recipe layout)

Output: `<home>/manifests/<key>/manifest.parquet` + `manifest.json` (see flywheel/data/manifest.py), where
key = hash of the inputs' content hashes + the ingest config. Ingesting the same input again returns the
existing artifact. Everything later stages rely on is checked before anything is written, cheap checks first, so
a bad dataset fails here in seconds instead of stalling a later stage; bad input raises IngestError naming the
file (and field, episode, frame or time) and what to do:
  - info.json: fps a positive number, totals (episodes, frames, tasks) matching the tables, camera shapes;
  - tables: every episode listed once and every listed episode present, lengths, task indices in the tasks table;
  - per-frame features: `required_features` present, every numeric feature numeric, of its declared shape and
    finite (NaN/inf rows named);
  - videos: frame rate and height x width of the stream against info.json, packets per episode, and every frame
    decoded strictly (`decode: all`; `sample` decodes each episode's first, middle and last frame);
  - splits: at least one real episode held out, unless `allow_no_holdout`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from flywheel.data.manifest import Manifest, as_manifest_frame, load_manifest, summarize, write_manifest
from flywheel.data.splits import assign_splits
from flywheel.data.video import VideoError, VideoScan, probe, read_frames
from flywheel.data.video import scan_video as read_video_stream
from flywheel.errors import IngestError
from flywheel.store import ArtifactStore, hash_json, hash_tree

__all__ = ["IngestConfig", "IngestError", "Manifest", "detect_format", "ingest", "load_manifest"]

SourceFormat = Literal["lerobot-v3.0", "lerobot-v2.1", "raw-videos"]
MANIFEST_SCHEMA = 3  # 2: is_synthetic; episode ids kept through refreshed versions; 3: splits follow content
KEY_LENGTH = 24
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class IngestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field("", description="dataset root / raw video folder, or a Hub repo id (online only); '' = the "
                                            "domain's: its newest refreshed version (see follow_refreshed), else its "
                                            "registered source, else <inbox>/<domain>")
    follow_refreshed: bool = Field(True, description="with source '': ingest the domain's newest refreshed version that "
                                                     "the build-on decision accepted, so each iteration builds on the last")
    format: Literal["auto", "lerobot", "lerobot-v2.1", "raw-videos"] = Field(
        "auto", description="auto = detect; lerobot = a LeRobot dataset of any supported version (v3.0, v2.1)")
    camera_key: str | None = Field(None, description="LeRobot video feature to use; None = the dataset's first camera")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.1, ge=0, lt=1)
    repo_id: str | None = Field(None, description="Hub repo id to download when `source` is not a local folder; "
                                "also names the dataset in episode ids (default: the folder name)")
    required_features: list[str] = Field(
        ["action", "observation.state"],
        description="LeRobot features every frame must have, numeric and finite (inverse dynamics, the quality "
                    "filters and refresh read them); every other numeric feature is checked when present")
    decode: Literal["all", "sample"] = Field(
        "all", description="all = decode every frame of every video (a damaged stream fails here, naming the file "
                           "and time; about 1,500 frames/s of 480p on one core); sample = the first, middle and "
                           "last frame of each episode (for very large datasets)")
    allow_no_holdout: bool = Field(
        False, description="accept a dataset whose split holds no real episode out (evaluation and the filters' "
                           "calibration then fall back to a training episode)")

    @model_validator(mode="after")
    def _train_gets_the_rest(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction}; "
                             "must be below 1 so that the train split is not empty")
        return self


# ----------------------------------------------------------------------------------------------- progress


class Progress:
    """Reports `{"stage": "ingest", "step", "done", "total", "item"}` to a callback, or draws a tqdm bar."""

    def __init__(self, callback: Callable[[dict], None] | None):
        self.callback = callback
        self.bar = None
        self.step, self.done, self.total = "", 0, 0

    def start(self, step: str, total: int) -> None:
        self.close()
        self.step, self.done, self.total = step, 0, total
        if self.callback is None:
            self.bar = tqdm(total=total, desc=f"ingest: {step}", unit="episode", leave=False)
        else:
            self.callback({"stage": "ingest", "step": step, "done": 0, "total": total})

    def advance(self, item: str = "") -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.callback is not None:
            self.callback({"stage": "ingest", "step": self.step, "done": self.done, "total": self.total, "item": item})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ----------------------------------------------------------------------------------------------- videos


def scan_video(path: Path, expected_fps: float | None = None, fps_source: str = "", *,
               expected_size: tuple[int, int] | None = None, size_source: str = "", decode: bool = True) -> VideoScan:
    """Check a video's stream header against the metadata (frame rate, height x width), then demux it and
    (with `decode`) decode every frame; IngestError names the file and what to do."""
    try:
        info = probe(path)
        if expected_fps is not None and abs(float(info["fps"]) - expected_fps) > 1e-3 * expected_fps:
            raise IngestError(f"{path}: video stream is {float(info['fps']):g} fps but {fps_source} says "
                              f"{expected_fps:g} fps; re-encode the video at the dataset's frame rate or fix the metadata")
        if expected_size is not None and (info["height"], info["width"]) != tuple(expected_size):
            raise IngestError(f"{path}: video frames are {info['height']}x{info['width']} (height x width) but "
                              f"{size_source} says {expected_size[0]}x{expected_size[1]}; re-encode the video at the "
                              "dataset's resolution or fix the metadata")
        return read_video_stream(path, decode=decode)
    except VideoError as e:
        raise IngestError(str(e)) from None


def episode_video_hash(scan: VideoScan, start_s: float, end_s: float, num_frames: int, what: str) -> str:
    """sha256 of the packets of frames in [start_s, end_s); checks there are exactly `num_frames` of them."""
    eps = 0.5 / scan.fps  # timestamps are rounded on write; half a frame decides which window a frame is in
    selected = [p for t, p in zip(scan.times, scan.packets) if start_s - eps <= t < end_s - eps]
    if len(selected) != num_frames:
        if scan.end_s < end_s - eps:
            raise IngestError(f"{scan.path}: video ends at {scan.end_s:.3f}s but {what} needs frames up to "
                              f"{end_s:.3f}s; the video is truncated, re-export it")
        raise IngestError(f"{scan.path}: {len(selected)} video frames between {start_s:.3f}s and {end_s:.3f}s but "
                          f"{what} has {num_frames} frames; the video and the metadata disagree")
    digest = hashlib.sha256()
    for packet in selected:
        digest.update(packet)
    return digest.hexdigest()


def check_sample_decodes(path: Path, windows: list[tuple[float, float]], fps: float) -> None:
    """decode="sample": the first, middle and last frame of each episode's window [start_s, end_s) decode."""
    for start_s, end_s in windows:
        middle = start_s + round((end_s - start_s) * fps / 2) / fps
        for t in sorted({start_s, middle, end_s - 1 / fps}):
            try:
                read_frames(path, t, t + 1 / fps)
            except VideoError as e:
                raise IngestError(f"{path}: the frame at {t:.3f}s does not decode ({e}); re-export or re-encode "
                                  "the video from its source") from None


# ----------------------------------------------------------------------------------------------- formats


def detect_format(path: str | Path) -> SourceFormat:
    """What a local folder holds: "lerobot-v3.0", "lerobot-v2.1" or "raw-videos"; IngestError when unclear."""
    # Imported here, not at the top: the source modules import IngestError and the video checks from this one.
    from flywheel.data import lerobot_source, raw_folder

    path = Path(path)
    if not path.is_dir():
        raise IngestError(f"{path}: not a folder; give a LeRobot dataset root or a raw video folder")
    if (path / "meta").is_dir():
        return lerobot_source.lerobot_version(path)
    if raw_folder.looks_like_raw_folder(path):
        return "raw-videos"
    raise IngestError(f"{path}: cannot tell the format; expected a LeRobot dataset (meta/info.json) or a raw video "
                      "folder (videos/*.mp4 with metas/*.txt captions)")


def check_format_matches(detected: SourceFormat, wanted: str, path: Path) -> None:
    accepted = {"auto": {"lerobot-v3.0", "lerobot-v2.1", "raw-videos"},
                "lerobot": {"lerobot-v3.0", "lerobot-v2.1"},
                "lerobot-v2.1": {"lerobot-v2.1"},
                "raw-videos": {"raw-videos"}}[wanted]
    if detected not in accepted:
        raise IngestError(f"{path}: is {detected} but the config asks for format {wanted!r}; "
                          f"set ingest.format to 'auto' or {detected!r}")


def resolve_source(config: IngestConfig) -> Path:
    """The local folder to read: `source` itself, or a Hub download when it is not a local folder."""
    local = Path(config.source).expanduser()
    if local.exists():
        return local.resolve()
    repo_id = config.repo_id or config.source
    if not HUB_REPO_ID.match(repo_id):
        raise IngestError(f"{config.source}: no such folder; give a dataset root, a raw video folder or a Hub repo id")
    from flywheel.data.lerobot_source import download_from_hub

    return download_from_hub(repo_id)


# ----------------------------------------------------------------------------------------------- ingest


def ingest(config: IngestConfig, store: ArtifactStore, progress: Callable[[dict], None] | None = None) -> Manifest:
    """Validate the demonstrations and write (or find) their episode manifest."""
    from flywheel.data import lerobot_source, raw_folder

    source_dir = resolve_source(config)
    source = detect_format(source_dir)
    check_format_matches(source, config.format, source_dir)
    dataset_name = config.repo_id or source_dir.name
    report = Progress(progress)
    try:
        if source == "raw-videos":
            input_hash = raw_folder.content_hash(source_dir)
            key = manifest_key(config, source, input_hash, source_dir, dataset_name)
            if store.exists("manifests", key):
                return load_manifest(store.path("manifests", key))
            episodes = raw_folder.read_raw_folder(source_dir, config.camera_key, dataset_name, report, config.decode)
            return write_new_manifest(store, key, config, source, source_dir, input_hash, episodes)

        if source == "lerobot-v3.0":
            input_hash = hash_tree(source_dir)
            key = manifest_key(config, source, input_hash, source_dir, dataset_name)
            if store.exists("manifests", key):
                return load_manifest(store.path("manifests", key))
            episodes = lerobot_source.read_lerobot_v3(source_dir, config, dataset_name, report)
            return write_new_manifest(store, key, config, source, source_dir, input_hash, episodes)

        # lerobot-v2.1: the converted v3.0 copy is an artifact of its own, keyed by the v2.1 content.
        input_hash = hash_tree(source_dir)
        converted_key = hash_json({"lerobot-v2.1": input_hash,
                                   "converter": f"lerobot {importlib.metadata.version('lerobot')}"})[:KEY_LENGTH]
        dataset_root = store.path("datasets", converted_key)
        key = manifest_key(config, source, input_hash, dataset_root, dataset_name)
        if store.exists("manifests", key):
            return load_manifest(store.path("manifests", key))
        with store.lock("datasets", converted_key):  # a second process converting the same input waits for this one
            if store.exists("datasets", converted_key):
                episodes = lerobot_source.read_lerobot_v3(dataset_root, config, dataset_name, report, decode=False)
            else:
                lerobot_source.check_v21(source_dir, config, report)
                meta = {"source": str(source_dir), "source_hash": input_hash, "format": "lerobot-v3.0",
                        "converted_from": "lerobot-v2.1"}
                with store.write("datasets", converted_key, meta) as tmp:
                    lerobot_source.convert_v21_to_v30(source_dir, tmp)
                    # Read (and so validate) before the rename: a conversion that cannot be ingested is not kept.
                    # Its frames were decoded in the v2.1 files already; the converter only concatenates them.
                    episodes = lerobot_source.read_lerobot_v3(tmp, config, dataset_name, report, decode=False)
        return write_new_manifest(store, key, config, source, dataset_root, input_hash, episodes)
    finally:
        report.close()


def manifest_key(config: IngestConfig, source: str, input_hash: str, dataset_root: Path, dataset_name: str) -> str:
    # The root's path is part of the key because rows hold absolute paths into it.
    return hash_json({
        "manifest_schema": MANIFEST_SCHEMA, "source": source, "input_hash": input_hash,
        "dataset_root": str(dataset_root), "dataset_name": dataset_name, "camera_key": config.camera_key,
        "val_fraction": config.val_fraction, "test_fraction": config.test_fraction,
    })[:KEY_LENGTH]


def write_new_manifest(store: ArtifactStore, key: str, config: IngestConfig, source: str, dataset_root: Path,
                       input_hash: str, episodes: list[dict]) -> Manifest:
    """Episodes (with `video_relpath` under the dataset root) -> the manifest artifact."""
    rows = []
    for episode in episodes:
        row = {k: v for k, v in episode.items() if k != "video_relpath"}
        row.update(source=source, dataset_root=str(dataset_root),
                   video_path=str(dataset_root / episode["video_relpath"]))
        rows.append(row)
    splits = assign_splits([r["split_key"] for r in rows], config.val_fraction, config.test_fraction)
    for row, split in zip(rows, splits):
        # Generated episodes only ever train: evaluation and filter calibration compare against real ones.
        row["split"] = "train" if row.get("is_synthetic") else split
    check_holdout(rows, config, dataset_root)
    frame = as_manifest_frame(rows)
    summary = {**summarize(frame), "key": key, "input_hash": input_hash, "config": config.model_dump(mode="json")}
    path, _ = store.build("manifests", key, lambda tmp: write_manifest(tmp, frame, summary),
                          {"episodes": summary["episodes"], "source": source})
    return Manifest(path=path, key=key, frame=frame, summary=summary)


def check_holdout(rows: list[dict], config: IngestConfig, dataset_root: Path) -> None:
    """Evaluation and the quality filters' calibration compare against real episodes the adapter never saw:
    a split that holds none out is refused unless the config accepts it."""
    real = [r for r in rows if not r.get("is_synthetic")]
    if config.allow_no_holdout or any(r["split"] != "train" for r in real):
        return
    raise IngestError(
        f"{dataset_root}: {len(real)} real episode(s), and the split (ingest.val_fraction={config.val_fraction}, "
        f"ingest.test_fraction={config.test_fraction}) holds none of them out; evaluation and the quality filters' "
        "calibration need held-out episodes. Add episodes, raise ingest.val_fraction, or set "
        "ingest.allow_no_holdout: true to go on without (they then use a training episode)")
