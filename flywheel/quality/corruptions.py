"""Known-bad clips, made in code from real clips: each corruption imitates one way generation fails.
Used to measure the filters (precision/recall), never to train anything.

`TARGETS` says which filter is meant to catch each corruption; a corruption may legitimately trip
others too (shuffling also breaks the first frame when frame 0 moves, so frame 0 is kept in place).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from flywheel.quality.calibration import Clip
from flywheel.quality.stats import blur

TARGETS: dict[str, list[str]] = {
    "frozen": ["static"],
    "flicker": ["flicker"],
    "blur": ["blur_exposure"],
    "overexposed": ["blur_exposure"],
    "shuffled": ["temporal"],
    "wrong_first_frame": ["first_frame"],
    "teleport": ["temporal"],
    "action_spike": ["action"],
    "duplicate": ["duplicate"],
}


def frozen(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The video stops after its first quarter: one frame repeated."""
    t = max(1, len(frames) // 4)
    return np.concatenate([frames[:t], np.repeat(frames[t - 1:t], len(frames) - t, axis=0)])


def flicker(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness jumps up and down from frame to frame (+-25%)."""
    gains = 1 + 0.25 * np.where(np.arange(len(frames)) % 2 == 0, 1, -1) * rng.uniform(0.7, 1.0, len(frames))
    gains[0] = 1.0
    return np.clip(frames.astype(np.float32) * gains[:, None, None, None], 0, 255).astype(np.uint8)


def blurred(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out of focus from frame 1 on (frame 0 stays sharp, as a generator would copy the conditioning frame)."""
    radius = max(frames.shape[1], frames.shape[2]) / 40
    return np.concatenate([frames[:1], blur(frames[1:], radius)])


def overexposed(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Washed out: brightness x1.8 + 40, clipped."""
    out = np.clip(frames.astype(np.float32) * 1.8 + 40, 0, 255).astype(np.uint8)
    out[0] = frames[0]
    return out


def shuffled(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Frame order lost (frame 0 kept, the rest permuted)."""
    order = np.concatenate([[0], 1 + rng.permutation(len(frames) - 1)])
    return frames[order]


def teleport(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Halfway through, two quarter-size regions swap places and stay swapped (objects jump)."""
    out = frames.copy()
    t0 = len(frames) // 2
    h, w = frames.shape[1] // 4, frames.shape[2] // 4
    (y1, x1), (y2, x2) = (frames.shape[1] // 3, frames.shape[2] // 6), (frames.shape[1] // 3, frames.shape[2] * 4 // 6)
    a = frames[t0:, y1:y1 + h, x1:x1 + w].copy()
    out[t0:, y1:y1 + h, x1:x1 + w] = frames[t0:, y2:y2 + h, x2:x2 + w]
    out[t0:, y2:y2 + h, x2:x2 + w] = a
    return out


VIDEO_CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "frozen": frozen, "flicker": flicker, "blur": blurred, "overexposed": overexposed,
    "shuffled": shuffled, "teleport": teleport,
}


def action_spike(actions: np.ndarray, scale: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One step of a few dims jumps by 6 real stds and back: an impossible command."""
    out = np.array(actions, dtype=np.float32, copy=True)
    t = int(rng.integers(1, len(out) - 1))
    dims = rng.choice(out.shape[1], size=max(1, out.shape[1] // 4), replace=False)
    out[t, dims] += 6 * np.asarray(scale, dtype=np.float32)[dims]
    return out


def corrupt(clip: Clip, kind: str, rng: np.random.Generator, donor: Clip | None = None,
            action_scale: np.ndarray | None = None) -> Clip:
    """A corrupted copy of a real clip, labelled with `kind`. `donor`: another real clip (wrong_first_frame
    takes its video; duplicate copies it into the donor's group); `action_scale`: per-dim real std."""
    frames = np.asarray(clip.frames)
    # Its own group: only the "duplicate" corruption should look like another seed of the same prompt.
    base = dict(clip.__dict__, clip_id=f"{clip.clip_id}-{kind}", kind=kind, disagreement=None, extra_stats={},
                group=f"{clip.clip_id}-{kind}")
    if kind in VIDEO_CORRUPTIONS:
        return Clip(**{**base, "frames": VIDEO_CORRUPTIONS[kind](frames, rng)})
    if kind == "wrong_first_frame":
        if donor is None:
            raise ValueError("wrong_first_frame needs a donor clip from elsewhere (another episode)")
        return Clip(**{**base, "frames": np.asarray(donor.frames)})
    if kind == "duplicate":
        if donor is None:
            raise ValueError("duplicate needs the donor clip it duplicates")
        noise = rng.normal(0, 2, np.asarray(donor.frames).shape)
        dup = np.clip(np.asarray(donor.frames).astype(np.float32) + noise, 0, 255).astype(np.uint8)
        return Clip(**{**base, "frames": dup, "first_frame": donor.first_frame, "group": donor.group,
                       "actions": donor.actions})
    if kind == "action_spike":
        if clip.actions is None or action_scale is None:
            raise ValueError("action_spike needs the clip's actions and the real per-dim action scale")
        return Clip(**{**base, "actions": action_spike(clip.actions, action_scale, rng)})
    raise ValueError(f"unknown corruption {kind!r}; known: {sorted(TARGETS)}")
