"""Training clips: demonstration episodes -> fixed-size video clips the world model trains on.

    clip_set = prepare_clips(manifest.frame, manifest.key, store, ClipConfig(), get_preset("tiny"))

Per episode (a row of the episode manifest): decode its time range from its video, resample to the
target fps by picking the nearest source frame for each output timestamp, resize to height x width
keeping the aspect ratio (`resize`, below), and cut windows of num_frames every `stride` output frames.
Episodes shorter than one window are skipped and listed in the summary. The prompt of a clip is `prompt_prefix + task`.

Artifact `<home>/clips/<key>/`, key = hash of the episodes' content hashes, splits and tasks + the
config + the resolved resolution/frames/fps (so the same inputs give the same key and the same bytes):

    clips.parquet        one row per clip, CLIP_COLUMNS
    videos/<clip_id>.mp4          H.264 (write_video: deterministic), num_frames at fps, height x width
    first_frames/<clip_id>.png    the clip's first frame (the image-to-world conditioning image)
    clipset.json         summary: counts, per-split clips, skipped episodes and why, resolved spec, config,
                         and `aspect`: the resize mode and, per source frame size, where the picture lies
    preview.png          contact sheet of a few clips

Resize modes (`ClipConfig.resize`):
- "pad" (default): scale the whole source frame to fit, centre it, black bars on the remaining sides
  (a 480x640 camera in a 64x64 clip: 48x64 picture, 8-pixel bars above and below). Nothing of the scene is
  lost and nothing is distorted, so a generated clip maps back to the camera's frame exactly
  (`restore_frames`), which the refresh needs to write generated frames into the source dataset; the price
  is the bars' share of the model's pixels. Square sources are unchanged (no bars).
- "center-crop": scale to cover and cut the overflow (a 4:3 camera loses 1/8 of its width on each side,
  where the robot's arms often are; a generated clip cannot be mapped back to the full camera frame).
- "stretch": scale each axis to fit (the diffusers recipe's VideoProcessor); distorts non-matching aspects.
Per clip, `content_top/left/height/width` give the rectangle of the clip frame that shows the picture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm.auto import tqdm

from flywheel.data.video import VideoError, read_frames, write_video
from flywheel.errors import ConfigError
from flywheel.store import ArtifactStore, hash_file, hash_json

if TYPE_CHECKING:
    from flywheel.model.presets import ModelPreset

# Bump when the clip-making algorithm changes, so old artifacts are not mistaken for new ones.
CLIPS_FORMAT = 2  # 2: aspect-keeping "pad" default, per-clip content box
CLIPS_FILE = "clips.parquet"
SUMMARY_FILE = "clipset.json"
PREVIEW_FILE = "preview.png"
PREVIEW_CLIPS = 4
# Episodes are decoded this many source frames at a time, so a long 480p episode never sits in memory whole.
DECODE_CHUNK_FRAMES = 150
# Wan VAE: 4x temporal compression with a causal first frame; 8x spatial, then the DiT's 2x2 patches.
FRAMES_MULTIPLE, FRAMES_REMAINDER = 4, 1
PIXELS_MULTIPLE = 16

MANIFEST_FIELDS = ("episode_id", "episode_index", "task", "fps", "video_path", "from_timestamp",
                   "to_timestamp", "content_hash", "split")

CLIP_COLUMNS = (
    "clip_id", "episode_id", "episode_index", "split", "prompt", "task",
    "start_frame",  # in resampled (output-fps) frames from the episode start
    "start_s",      # the same, in seconds from the episode start
    "num_frames", "fps", "height", "width",
    "video",        # relative path of the mp4 inside the clip set
    "first_frame",  # relative path of the PNG inside the clip set
    "sha256",       # of the mp4
    # The rectangle of the clip frame that shows the source picture (the whole frame unless resize is "pad").
    "content_top", "content_left", "content_height", "content_width",
)
RESIZE_MODES = ("pad", "center-crop", "stretch")
# What each mode does to a source of another aspect ratio, written into the clip set's summary.
ASPECT_NOTES = {
    "pad": "aspect ratio kept, whole picture, black bars on the short sides; generated clips map back exactly",
    "center-crop": "aspect ratio kept, the overflowing sides cut off",
    "stretch": "scaled per axis to the clip size: other aspect ratios are distorted",
}


class ClipConfig(BaseModel):
    """How episodes become clips. None means: the model preset's value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt_prefix: str = "The robot arm is performing a task. "
    fps: int | None = Field(None, gt=0, description="clip frame rate; None = the model preset's (16 for Cosmos)")
    height: int | None = Field(None, gt=0, description="None = the model preset's")
    width: int | None = Field(None, gt=0, description="None = the model preset's")
    num_frames: int | None = Field(None, gt=0, description="frames per clip, 4k+1; None = the model preset's")
    stride: int | None = Field(None, gt=0, description="window step in output frames; None = num_frames (no overlap)")
    max_clips_per_episode: int | None = Field(None, gt=0, description="None = every window; else spread evenly")
    resize: Literal["pad", "center-crop", "stretch"] = Field(
        "pad", description="pad: keep the aspect ratio, black bars (default; invertible); center-crop: keep the "
                           "aspect ratio, cut the overflow; stretch: distort to fit")

    # Checked here too (not only once the preset fills the Nones in), so a bad size fails before ingest runs.
    @field_validator("num_frames")
    @classmethod
    def _frames_fit_the_vae(cls, value: int | None) -> int | None:
        if value is not None and value % FRAMES_MULTIPLE != FRAMES_REMAINDER:
            raise ValueError(f"{value} frames: the Cosmos VAE needs 4k+1 frames (e.g. 17, 33, 93)")
        return value

    @field_validator("height", "width")
    @classmethod
    def _pixels_fit_the_vae(cls, value: int | None) -> int | None:
        if value is not None and value % PIXELS_MULTIPLE:
            raise ValueError(f"{value} pixels: must be a multiple of {PIXELS_MULTIPLE} (VAE 8x downsampling, then 2x2 "
                             "patches)")
        return value


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """A ClipConfig with the preset's values filled in: what the clips actually are."""

    fps: int
    height: int
    width: int
    num_frames: int
    stride: int

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def resolve_spec(config: ClipConfig, preset: ModelPreset) -> ClipSpec:
    """Fill config Nones from the preset and check the sizes fit the Cosmos VAE and DiT."""
    num_frames = config.num_frames or preset.num_frames
    spec = ClipSpec(
        fps=config.fps or preset.fps,
        height=config.height or preset.height,
        width=config.width or preset.width,
        num_frames=num_frames,
        stride=config.stride or num_frames,
    )
    if spec.num_frames % FRAMES_MULTIPLE != FRAMES_REMAINDER:
        raise ConfigError(f"clips.num_frames={spec.num_frames}: the Cosmos VAE needs 4k+1 frames "
                         f"(e.g. 17, 33, 93); set clips.num_frames accordingly")
    for name in ("height", "width"):
        value = getattr(spec, name)
        if value % PIXELS_MULTIPLE:
            raise ConfigError(f"clips.{name}={value}: must be a multiple of {PIXELS_MULTIPLE} "
                             f"(VAE 8x downsampling, then 2x2 patches)")
    return spec


@dataclasses.dataclass
class ClipSet:
    path: Path               # the artifact directory <home>/clips/<key>
    key: str
    frame: pd.DataFrame      # CLIP_COLUMNS
    summary: dict[str, Any]
    reused: bool = False     # True when the artifact already existed and nothing was computed

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)


def clip_content_box(clip) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a clip row's picture (the whole frame for clip sets made before format 2)."""
    if "content_height" not in clip or pd.isna(clip["content_height"]):
        return 0, 0, int(clip["height"]), int(clip["width"])
    return tuple(int(clip[f"content_{k}"]) for k in ("top", "left", "height", "width"))


def load_clip_set(path: str | Path) -> ClipSet:
    path = Path(path)
    if not (path / CLIPS_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a clip set (no {CLIPS_FILE}); run the clips stage first")
    summary = json.loads((path / SUMMARY_FILE).read_text())
    return ClipSet(path=path, key=path.name, frame=pd.read_parquet(path / CLIPS_FILE), summary=summary)


# --- frames -------------------------------------------------------------------------------------


def resample_indices(num_source_frames: int, source_fps: float, target_fps: float) -> np.ndarray:
    """For each output frame, the source frame nearest its timestamp (round half up), within the episode."""
    if num_source_frames <= 0:
        return np.zeros(0, dtype=np.int64)
    duration_s = num_source_frames / source_fps
    count = math.ceil(duration_s * target_fps + 1e-9)
    indices = np.floor(np.arange(count) * (source_fps / target_fps) + 0.5).astype(np.int64)
    return indices[indices < num_source_frames]


def content_box(source_height: int, source_width: int, height: int, width: int, mode: str) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the part of a height x width clip frame that shows the source picture."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"clips.resize={mode!r}: must be one of {RESIZE_MODES}")
    if mode != "pad":
        return 0, 0, height, width
    scale = min(width / source_width, height / source_height)
    h = min(height, max(1, round(source_height * scale)))
    w = min(width, max(1, round(source_width * scale)))
    return (height - h) // 2, (width - w) // 2, h, w


def resize_frame(frame: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3], bilinear, as `mode` says (module docstring)."""
    image = Image.fromarray(frame)
    src_w, src_h = image.size
    top, left, h, w = content_box(src_h, src_w, height, width, mode)
    if mode == "center-crop":
        scale = max(width / src_w, height / src_h)
        crop_w, crop_h = width / scale, height / scale
        x0, y0 = (src_w - crop_w) / 2, (src_h - crop_h) / 2
        return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR,
                                       box=(x0, y0, x0 + crop_w, y0 + crop_h)))
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    if (h, w) == (height, width):
        return np.asarray(image)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[top:top + h, left:left + w] = np.asarray(image)
    return canvas


def restore_frames(frames: np.ndarray, box: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Clip-sized frames [T, h, w, 3] (e.g. generated from a "pad" clip) back to the source camera's
    height x width: the content box cut out, then resized (bilinear). The inverse of "pad" up to resolution."""
    top, left, h, w = (int(v) for v in box)
    picture = np.asarray(frames)[:, top:top + h, left:left + w]
    if picture.shape[1:3] == (height, width):
        return np.ascontiguousarray(picture)
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), Image.Resampling.BILINEAR))
                     for f in picture])


def episode_frames(row: pd.Series, spec: ClipSpec, resize: str) -> tuple[np.ndarray, int, tuple[int, int]]:
    """The episode resampled to spec.fps and resized: (uint8 [T, H, W, 3], number of source frames decoded,
    source frame (height, width)).

    Decoded in chunks whose boundaries fall on source frame times, so every source frame lands in
    exactly one chunk (read_frames keeps half a frame of slack on both ends).
    """
    source_fps = float(row["fps"])
    start_s, end_s = float(row["from_timestamp"]), float(row["to_timestamp"])
    if not (math.isfinite(start_s) and math.isfinite(end_s) and end_s > start_s and source_fps > 0):
        raise ValueError(f"episode {row['episode_id']}: bad manifest time range {start_s}..{end_s} s "
                         f"at {source_fps} fps in {row['video_path']}; re-run ingest")
    expected = round((end_s - start_s) * source_fps)
    wanted = resample_indices(expected, source_fps, spec.fps)
    picked: list[np.ndarray] = []
    decoded, source_size = 0, (0, 0)
    for chunk_start in range(0, expected, DECODE_CHUNK_FRAMES):
        chunk_end = min(chunk_start + DECODE_CHUNK_FRAMES, expected)
        frames = read_frames(row["video_path"], start_s + chunk_start / source_fps,
                             end_s if chunk_end == expected else start_s + chunk_end / source_fps)
        in_chunk = wanted[(wanted >= decoded) & (wanted < decoded + len(frames))] - decoded
        picked.extend(resize_frame(frames[i], spec.height, spec.width, resize) for i in in_chunk)
        decoded += len(frames)
        if len(frames):
            source_size = tuple(frames.shape[1:3])
    if not picked:
        return np.zeros((0, spec.height, spec.width, 3), dtype=np.uint8), decoded, source_size
    return np.stack(picked), decoded, source_size


def window_starts(num_frames_available: int, spec: ClipSpec, max_clips: int | None) -> list[int]:
    """Start frames of the windows; with a cap, windows spread evenly over the episode (first and last kept)."""
    starts = list(range(0, num_frames_available - spec.num_frames + 1, spec.stride))
    if max_clips is not None and len(starts) > max_clips:
        picks = np.linspace(0, len(starts) - 1, max_clips).round().astype(int)
        starts = [starts[i] for i in sorted(set(picks.tolist()))]
    return starts


# --- the artifact -------------------------------------------------------------------------------


def check_manifest(manifest: pd.DataFrame, manifest_key: str) -> None:
    missing = [c for c in MANIFEST_FIELDS if c not in manifest.columns]
    if missing:
        raise ValueError(f"episode manifest {manifest_key}: missing column(s) {missing}; "
                         "it must come from the ingest stage (flywheel.data.ingest)")
    if manifest.empty:
        raise ValueError(f"episode manifest {manifest_key}: has no episodes; ingest a dataset with episodes first")
    duplicated = manifest["episode_id"][manifest["episode_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"episode manifest {manifest_key}: duplicate episode_id(s) {duplicated[:5]}")


def clip_set_key(manifest: pd.DataFrame, config: ClipConfig, spec: ClipSpec) -> str:
    episodes = sorted(manifest[["episode_id", "content_hash", "split", "task"]].astype(str).values.tolist())
    return hash_json({"format": CLIPS_FORMAT, "episodes": episodes, "config": config.model_dump(mode="json"),
                      "spec": spec.as_dict()})[:24]


def safe_name(text: str) -> str:
    """A file-name-safe version of an id ("g1/000003" -> "g1-000003")."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "episode"


def _reporter(progress: Callable[[dict], None] | None, total: int):
    bar = None if progress else tqdm(total=total, desc="clips", unit="episode", leave=False)

    def report(done: int, clips: int, item: str) -> None:
        if progress:
            progress({"stage": "clips", "step": "episodes", "done": done, "total": total, "clips": clips,
                      "item": item})
        else:
            bar.update(1)
            bar.set_postfix(clips=clips)

    return report, (bar.close if bar else (lambda: None))


def write_clips(tmp: Path, manifest: pd.DataFrame, config: ClipConfig, spec: ClipSpec,
                progress: Callable[[dict], None] | None) -> dict[str, Any]:
    """Fill the artifact temp dir; returns the summary parts that depend on the episodes."""
    (tmp / "videos").mkdir()
    (tmp / "first_frames").mkdir()
    rows: list[dict] = []
    skipped: list[dict] = []
    frame_count_mismatch: list[dict] = []
    source_sizes: dict[str, dict] = {}
    episodes = manifest.sort_values(["episode_index", "episode_id"], kind="stable")
    report, close = _reporter(progress, len(episodes))
    try:
        for done, (_, episode) in enumerate(episodes.iterrows(), start=1):
            try:
                frames, decoded, source_size = episode_frames(episode, spec, config.resize)
            except VideoError as e:
                raise VideoError(f"episode {episode['episode_id']}: {e}") from e
            if "num_frames" in episode and abs(decoded - int(episode["num_frames"])) > 1:
                frame_count_mismatch.append(dict(episode_id=episode["episode_id"], manifest=int(episode["num_frames"]),
                                                 decoded=decoded))
            box = content_box(*source_size, spec.height, spec.width, config.resize) if decoded else None
            if box is not None:
                source_sizes.setdefault(f"{source_size[0]}x{source_size[1]}", dict(
                    content_box=list(box), episodes=0))["episodes"] += 1
            starts = window_starts(len(frames), spec, config.max_clips_per_episode)
            if not starts:
                skipped.append(dict(episode_id=str(episode["episode_id"]), frames_at_fps=int(len(frames)),
                                    reason=f"shorter than one clip ({len(frames)} < {spec.num_frames} frames "
                                           f"at {spec.fps} fps)"))
            for start in starts:
                rows.append(write_clip(tmp, episode, frames[start:start + spec.num_frames], start, config, spec, box))
            report(done, len(rows), str(episode["episode_id"]))
    finally:
        close()
    if not rows:
        raise ValueError(f"no clips: all {len(manifest)} episodes are shorter than {spec.num_frames} frames at "
                         f"{spec.fps} fps; lower clips.num_frames or clips.fps, or ingest longer episodes")
    clips = pd.DataFrame(rows, columns=list(CLIP_COLUMNS))
    clips.to_parquet(tmp / CLIPS_FILE, index=False)
    write_preview(tmp, clips)
    return dict(
        episodes=int(len(manifest)),
        episodes_used=int(len(manifest) - len(skipped)),
        episodes_skipped=len(skipped),
        skipped=skipped,
        frame_count_mismatch=frame_count_mismatch,
        clips=int(len(clips)),
        clips_per_split={k: int(v) for k, v in clips["split"].value_counts().sort_index().items()},
        prompts=int(clips["prompt"].nunique()),
        aspect=dict(resize=config.resize, why=ASPECT_NOTES[config.resize], source_sizes=source_sizes),
    )


def write_clip(tmp: Path, episode: pd.Series, frames: np.ndarray, start: int, config: ClipConfig,
               spec: ClipSpec, box: tuple[int, int, int, int]) -> dict:
    clip_id = f"{safe_name(str(episode['episode_id']))}-f{start:05d}"
    video = f"videos/{clip_id}.mp4"
    first_frame = f"first_frames/{clip_id}.png"
    if (tmp / video).exists():
        raise ValueError(f"episode {episode['episode_id']}: clip id {clip_id} collides with another episode's; "
                         "episode ids must differ after replacing characters other than letters, digits, _ and .")
    write_video(tmp / video, frames, spec.fps)
    Image.fromarray(frames[0]).save(tmp / first_frame, format="PNG")
    return dict(
        clip_id=clip_id, episode_id=str(episode["episode_id"]), episode_index=int(episode["episode_index"]),
        split=str(episode["split"]), prompt=config.prompt_prefix + str(episode["task"]), task=str(episode["task"]),
        start_frame=int(start), start_s=start / spec.fps, num_frames=int(len(frames)), fps=spec.fps,
        height=spec.height, width=spec.width, video=video, first_frame=first_frame, sha256=hash_file(tmp / video),
        content_top=box[0], content_left=box[1], content_height=box[2], content_width=box[3],
    )


def write_preview(root: Path, clips: pd.DataFrame) -> Path:
    """Contact sheet of up to PREVIEW_CLIPS clips spread over the set, decoded back from their mp4s."""
    from flywheel.preview import contact_sheet

    picks = sorted(set(np.linspace(0, len(clips) - 1, min(PREVIEW_CLIPS, len(clips))).round().astype(int).tolist()))
    chosen = clips.iloc[picks]
    videos = [read_frames(root / v) for v in chosen["video"]]
    labels = [f"{c} [{s}]" for c, s in zip(chosen["clip_id"], chosen["split"])]
    return contact_sheet(videos, labels, root / PREVIEW_FILE)


def prepare_clips(
    manifest: pd.DataFrame,
    manifest_key: str,
    store: ArtifactStore,
    config: ClipConfig,
    preset: ModelPreset,
    progress: Callable[[dict], None] | None = None,
) -> ClipSet:
    """Episodes -> clips artifact (or the existing one when the same inputs were prepared before)."""
    check_manifest(manifest, manifest_key)
    spec = resolve_spec(config, preset)
    key = clip_set_key(manifest, config, spec)
    if store.exists("clips", key):
        return dataclasses.replace(load_clip_set(store.path("clips", key)), reused=True)
    summary: dict[str, Any] = {"key": key, "manifest_key": manifest_key, "preset": preset.name, **spec.as_dict(),
                               "resize": config.resize, "config": config.model_dump(mode="json")}
    meta: dict[str, Any] = {}
    with store.write("clips", key, meta) as tmp:
        summary.update(write_clips(tmp, manifest, config, spec, progress))
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
        meta.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    return load_clip_set(store.path("clips", key))
