"""A raw video folder as ingest input, laid out like the diffusers Cosmos LoRA recipe's dataset:

  <root>/videos/<stem>.mp4   one episode per video
  <root>/metas/<stem>.txt    its caption (the prompt), UTF-8 text

Every video needs a caption and every caption a video; all videos share one frame rate (training
clips are cut at a fixed rate). The episode id is "<folder name>/<stem>", so adding videos never
renames the ones already there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from flywheel.data.ingest import IngestError, Progress, check_sample_decodes, episode_video_hash, scan_video
from flywheel.store import hash_file, hash_json

CAMERA_KEY = "video"


def looks_like_raw_folder(root: Path) -> bool:
    return (root / "videos").is_dir() or (root / "metas").is_dir()


def video_caption_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(video, caption) per stem, sorted by stem; IngestError for anything without its partner."""
    videos_dir, metas_dir = root / "videos", root / "metas"
    for folder in (videos_dir, metas_dir):
        if not folder.is_dir():
            raise IngestError(f"{folder}: not found; a raw video folder needs videos/<name>.mp4 and "
                              "metas/<name>.txt (one caption per video)")
    videos = {p.stem: p for p in videos_dir.glob("*.mp4")}
    captions = {p.stem: p for p in metas_dir.glob("*.txt")}
    if not videos:
        raise IngestError(f"{videos_dir}: no .mp4 videos; the folder has 0 episodes")
    if orphans := sorted(captions.keys() - videos.keys()):
        raise IngestError(f"{captions[orphans[0]]}: caption without a video; add videos/{orphans[0]}.mp4 or remove "
                          f"the caption ({len(orphans)} caption(s) without video: {', '.join(orphans)})")
    if orphans := sorted(videos.keys() - captions.keys()):
        raise IngestError(f"{videos[orphans[0]]}: video without a caption; add metas/{orphans[0]}.txt with its "
                          f"description ({len(orphans)} video(s) without caption: {', '.join(orphans)})")
    return [(videos[s], captions[s]) for s in sorted(videos)]


def content_hash(root: Path) -> str:
    """Hash of the files ingest reads (names and bytes); other files in the folder do not count."""
    files = {}
    for video, caption in video_caption_pairs(root):
        files[video.relative_to(root).as_posix()] = hash_file(video)
        files[caption.relative_to(root).as_posix()] = hash_file(caption)
    return hash_json(files)


def read_caption(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise IngestError(f"{path}: caption is not UTF-8 text ({e})") from None
    if not text:
        raise IngestError(f"{path}: caption is empty; write the video's description into it")
    return text


def read_raw_folder(root: Path, camera_key: str | None, dataset_name: str, report: Progress,
                    decode: str = "all") -> list[dict]:
    """Every video as a manifest row (video path relative to `root`), all checked."""
    if camera_key not in (None, CAMERA_KEY):
        raise IngestError(f"{root}: unknown camera_key {camera_key!r}; a raw video folder has one camera, "
                          f"{CAMERA_KEY!r} (or leave camera_key unset)")
    pairs = video_caption_pairs(root)
    rows, fps = [], None
    report.start("check videos", len(pairs))
    for index, (video, caption) in enumerate(pairs):
        task = read_caption(caption)
        scan = scan_video(video, decode=decode == "all")
        if fps is None:
            fps, first = scan.fps, video
        elif abs(scan.fps - fps) > 1e-3 * fps:
            raise IngestError(f"{video}: {scan.fps:g} fps but {first.name} is {fps:g} fps; all videos of a folder "
                              "must share one frame rate, re-encode this one")
        start_s, num_frames = min(scan.times), len(scan.packets)
        end_s = start_s + num_frames / scan.fps
        video_hash = episode_video_hash(scan, start_s, end_s, num_frames, f"video {video.name}")
        if decode == "sample":
            check_sample_decodes(video, [(start_s, end_s)], scan.fps)
        rows.append(dict(
            episode_id=f"{dataset_name}/{video.stem}", episode_index=index, task=task, camera_key=CAMERA_KEY,
            fps=scan.fps, num_frames=num_frames, video_relpath=video.relative_to(root).as_posix(),
            from_timestamp=start_s, to_timestamp=end_s,
            content_hash=hashlib.sha256(f"{video_hash}:{task}".encode()).hexdigest(),
            split_key=video_hash,  # the recorded frames; renaming the file or rewording its caption keeps the split
        ))
        report.advance(video.name)
    return rows
