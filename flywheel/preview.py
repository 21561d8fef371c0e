"""Pictures of videos for people: a contact-sheet PNG (one row per video) and an animated GIF.

Used by every stage that makes or judges videos (clips, evaluation, generation, filtering) so the
Dagster UI and a person browsing the flywheel home can look instead of read:

    contact_sheet([real, generated], ["real", "adapter"], out / "preview.png")

Layout of a contact sheet, in pixels (cell = one frame scaled to cell_w x cell_h):

    width  = PAD + frames_per_video * (cell_w + PAD)
    height = PAD + len(videos) * (LABEL_H + cell_h + PAD)

Each row starts with a label strip; each cell shows the frame's index in its top-left corner.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from flywheel.store import atomic_write_bytes

PAD = 2
LABEL_H = 14
AUTO_CELL_HEIGHT = 128  # scale=None: frames are scaled to this height, small enough for a sheet, large enough to see
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def _check_videos(videos: list[np.ndarray], labels: list[str] | None, what: str) -> None:
    if not videos:
        raise ValueError(f"{what}: no videos given; pass at least one uint8 [T, H, W, 3] array")
    for i, video in enumerate(videos):
        video = np.asarray(video)
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or len(video) == 0:
            raise ValueError(f"{what}: video {i} must be a non-empty uint8 [T, H, W, 3] array, "
                             f"got {video.dtype} {video.shape}")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"{what}: {len(labels)} labels for {len(videos)} videos; give one label per video or None")


def cell_size(first_video: np.ndarray, scale: float | None) -> tuple[int, int]:
    """(width, height) of one cell: the first video's frame size times `scale` (None: AUTO_CELL_HEIGHT tall)."""
    height, width = first_video.shape[1:3]
    if scale is None:
        scale = AUTO_CELL_HEIGHT / height
    if scale <= 0:
        raise ValueError(f"contact sheet scale must be > 0, got {scale}")
    return max(1, round(width * scale)), max(1, round(height * scale))


def sample_indices(num_frames: int, count: int) -> list[int]:
    """`count` frame indices spread evenly from the first to the last frame (repeats when the video is short)."""
    return [int(i) for i in np.linspace(0, num_frames - 1, count).round()]


def _frame_image(frame: np.ndarray, size: tuple[int, int]) -> Image.Image:
    image = Image.fromarray(frame)
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)


def contact_sheet(
    videos: list[np.ndarray],
    labels: list[str] | None,
    path: str | os.PathLike,
    frames_per_video: int = 6,
    scale: float | None = None,
    min_width: int = 0,
) -> Path:
    """Render one row per video of `frames_per_video` frames sampled across time; write a PNG atomically.

    Videos of another size than the first are stretched to its cell size so rows line up; `min_width` widens the
    sheet for long labels (e.g. a rejected clip's reasons).
    """
    _check_videos(videos, labels, f"contact_sheet({path})")
    if frames_per_video < 1:
        raise ValueError(f"contact_sheet({path}): frames_per_video must be >= 1, got {frames_per_video}")
    cell_w, cell_h = cell_size(np.asarray(videos[0]), scale)
    row_h = LABEL_H + cell_h + PAD
    width = max(min_width, PAD + frames_per_video * (cell_w + PAD))
    sheet = Image.new("RGB", (width, PAD + len(videos) * row_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, video in enumerate(videos):
        video = np.asarray(video)
        top = PAD + row * row_h
        label = labels[row] if labels is not None else f"video {row}"
        draw.text((PAD + 1, top + 1), f"{label}  ({len(video)} frames)", fill=TEXT, font=font)
        for col, index in enumerate(sample_indices(len(video), frames_per_video)):
            left = PAD + col * (cell_w + PAD)
            sheet.paste(_frame_image(video[index], (cell_w, cell_h)), (left, top + LABEL_H))
            draw.text((left + 2, top + LABEL_H + 1), str(index), fill=TEXT, font=font, stroke_width=1,
                      stroke_fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def animated_gif(
    videos: list[np.ndarray],
    path: str | os.PathLike,
    fps: float,
    scale: float | None = None,
) -> Path:
    """The videos side by side, played together as a looping GIF (a shorter video holds its last frame)."""
    _check_videos(videos, None, f"animated_gif({path})")
    if fps <= 0:
        raise ValueError(f"animated_gif({path}): fps must be > 0, got {fps}")
    cell_w, cell_h = cell_size(np.asarray(videos[0]), scale)
    length = max(len(v) for v in videos)
    frames = []
    for t in range(length):
        canvas = Image.new("RGB", (PAD + len(videos) * (cell_w + PAD), cell_h + 2 * PAD), BACKGROUND)
        for i, video in enumerate(videos):
            frame = np.asarray(video)[min(t, len(video) - 1)]
            canvas.paste(_frame_image(frame, (cell_w, cell_h)), (PAD + i * (cell_w + PAD), PAD))
        frames.append(canvas)
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return atomic_write_bytes(path, buffer.getvalue())
