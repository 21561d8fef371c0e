"""Known-bad clips, made in code from real clips: each corruption imitates one way generation fails.
Used to measure the filters (precision/recall, leave-one-family-out generalization), never to tune a
threshold: thresholds come from real clips only.

A *family* is one kind of failure at two strengths (`weak`, `strong`); the strong strength of the
families named in `TARGETS` is the project's original corruption of that name, so the unit tests and the
benchmark measure the same thing. `TARGETS` says which filter is meant to catch each original kind; a
corruption may legitimately trip others too.

Frame 0 is kept where the failure would keep it: a generator copies its conditioning frame into frame 0,
so most failures start after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import cv2
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
    "teleport": ["persistence"],
    "action_spike": ["action"],
    "duplicate": ["duplicate"],
}


# ── Video corruptions: (frames [T,H,W,3] uint8, level, rng) -> frames ─────────────────────────────────────

def freeze(frames: np.ndarray, moving_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """The video stops after its first `moving_fraction`: one frame repeated."""
    t = max(1, int(round(len(frames) * moving_fraction)))
    return np.concatenate([frames[:t], np.repeat(frames[t - 1:t], len(frames) - t, axis=0)])


def still_ramp(frames: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Nothing moves (frame 0 held) while the brightness slowly ramps to x(1 + gain): a still frame that
    fools a motion statistic computed on brightness differences."""
    ramp = 1 + gain * np.linspace(0, 1, len(frames))
    return _gain(np.repeat(frames[:1], len(frames), axis=0), ramp)


def flicker(frames: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness jumps up and down from frame to frame (+-amplitude)."""
    gains = 1 + amplitude * np.where(np.arange(len(frames)) % 2 == 0, 1, -1) * rng.uniform(0.7, 1.0, len(frames))
    gains[0] = 1.0
    return _gain(frames, gains)


def blurred(frames: np.ndarray, radius_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Out of focus from frame 1 on (Gaussian radius = fraction of the larger side)."""
    radius = max(frames.shape[1], frames.shape[2]) * radius_fraction
    return np.concatenate([frames[:1], blur(frames[1:], radius)])


def overexposed(frames: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Washed out from frame 1 on: brightness x(1 + level) + 50 level, clipped (level 0.8: x1.8 + 40)."""
    out = np.clip(frames.astype(np.float32) * (1 + level) + 50 * level, 0, 255).astype(np.uint8)
    out[0] = frames[0]
    return out


def recoloured(frames: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """Colours drift while brightness stays: the chroma (Cr, Cb) turns by an angle that grows linearly from 0
    at frame 0 to `degrees` at the last frame; luma is untouched."""
    out = frames.copy()
    for t, angle in enumerate(np.radians(degrees) * np.linspace(0, 1, len(frames))):
        if t == 0:
            continue
        ycc = cv2.cvtColor(frames[t], cv2.COLOR_RGB2YCrCb).astype(np.float32)
        cr, cb = ycc[..., 1] - 128, ycc[..., 2] - 128
        c, s = np.cos(angle), np.sin(angle)
        ycc[..., 1], ycc[..., 2] = 128 + c * cr - s * cb, 128 + s * cr + c * cb
        out[t] = cv2.cvtColor(np.clip(np.rint(ycc), 0, 255).astype(np.uint8), cv2.COLOR_YCrCb2RGB)
    return out


def shuffled(frames: np.ndarray, swaps: float, rng: np.random.Generator) -> np.ndarray:
    """Frame order lost. swaps >= 1: that many swaps of two neighbouring frames (a local reordering);
    swaps == 0: every frame but frame 0 permuted."""
    if swaps == 0:
        return frames[np.concatenate([[0], 1 + rng.permutation(len(frames) - 1)])]
    order = np.arange(len(frames))
    starts = rng.choice(np.arange(1, len(frames) - 1, 2), size=int(swaps), replace=False)
    for t in starts:
        order[t], order[t + 1] = order[t + 1], order[t]
    return frames[order]


def reversed_motion(frames: np.ndarray, turn_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Time runs backwards. turn_fraction 0: the whole clip backwards, from its last frame (the
    conditioning frame is set to match, see `corrupt_family`); otherwise forward until that fraction, then
    back the way it came (a rewind)."""
    if turn_fraction == 0:
        return frames[::-1].copy()
    m = int(round((len(frames) - 1) * turn_fraction))
    back = np.arange(m - 1, m - 1 - (len(frames) - 1 - m), -1).clip(0)
    return frames[np.concatenate([np.arange(m + 1), back])]


def teleport(frames: np.ndarray, size_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Halfway through, an object jumps: the busiest box (size_fraction of the height; see `_busiest_box`)
    swaps places with the box half a frame away, and both stay swapped.

    Not two fixed regions: on PushT, most of the frame is plain floor, and 31 of 69 strong swaps of the two
    fixed boxes this corruption used before changed at most 10 pixels by more than 40 gray levels (a sliver
    of the T): no object jumped."""
    out = frames.copy()
    t0 = len(frames) // 2
    h, w = frames.shape[1:3]
    size = max(3, int(h * size_fraction))
    y1, x1 = _busiest_box(frames[t0], size)
    y2, x2 = (y1 + h // 2) % (h - size), (x1 + w // 2) % (w - size)
    a = frames[t0:, y1:y1 + size, x1:x1 + size].copy()
    out[t0:, y1:y1 + size, x1:x1 + size] = frames[t0:, y2:y2 + size, x2:x2 + size]
    out[t0:, y2:y2 + size, x2:x2 + size] = a
    return out


def _busiest_box(frame: np.ndarray, size: int) -> tuple[int, int]:
    """Top-left corner of the size x size box with the most gray-level contrast: where an object is."""
    g = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    mean = cv2.boxFilter(g, -1, (size, size), normalize=True)
    var = cv2.boxFilter(g * g, -1, (size, size), normalize=True) - mean**2
    half = size // 2
    inner = var[half:g.shape[0] - size + half + 1, half:g.shape[1] - size + half + 1]
    y, x = np.unravel_index(int(np.argmax(inner)), inner.shape)
    return int(y), int(x)


def vanish(frames: np.ndarray, size_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Halfway through, whatever is in the busiest box (an object) disappears: the box is filled in from
    its surroundings (OpenCV inpainting) in every later frame."""
    out = frames.copy()
    t0 = len(frames) // 2
    size = max(3, int(frames.shape[1] * size_fraction))
    y, x = _busiest_box(frames[t0], size)
    mask = np.zeros(frames.shape[1:3], np.uint8)
    mask[y:y + size, x:x + size] = 255
    for t in range(t0, len(frames)):
        out[t] = cv2.inpaint(frames[t], mask, 3, cv2.INPAINT_TELEA)
    return out


def appear(frames: np.ndarray, size_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Halfway through, a copy of the busiest box (an object) appears elsewhere and stays there."""
    out = frames.copy()
    t0 = len(frames) // 2
    h, w = frames.shape[1:3]
    size = max(3, int(h * size_fraction))
    y, x = _busiest_box(frames[t0], size)
    y2, x2 = (y + h // 2) % (h - size), (x + w // 2) % (w - size)
    out[t0:, y2:y2 + size, x2:x2 + size] = frames[t0, y:y + size, x:x + size]
    return out


def noisy(frames: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor-like Gaussian noise (sigma gray levels) from frame 1 on."""
    out = frames.astype(np.float32)
    out[1:] += rng.normal(0, sigma, out[1:].shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gain(frames: np.ndarray, gains: np.ndarray) -> np.ndarray:
    return np.clip(frames.astype(np.float32) * np.asarray(gains, np.float32)[:, None, None, None], 0, 255).astype(np.uint8)


# ── Action corruptions (the pseudo-actions an IDM gets wrong): (actions, level, scale, rng) -> actions ─────

def action_spike(actions: np.ndarray, scale: np.ndarray, rng: np.random.Generator, stds: float = 6.0) -> np.ndarray:
    """One step of a quarter of the dims jumps by `stds` real stds and back: an impossible command."""
    out = np.array(actions, dtype=np.float32, copy=True)
    t = int(rng.integers(1, len(out) - 1))
    dims = rng.choice(out.shape[1], size=max(1, out.shape[1] // 4), replace=False)
    out[t, dims] += stds * np.asarray(scale, dtype=np.float32)[dims]
    return out


def action_drift(actions: np.ndarray, scale: np.ndarray, rng: np.random.Generator, stds: float = 3.0) -> np.ndarray:
    """The labels drift away from what the video shows: a bias growing linearly to `stds` real stds (every
    dim, random signs) by the last step, as an IDM that has lost track would produce."""
    out = np.array(actions, dtype=np.float32, copy=True)
    signs = rng.choice([-1.0, 1.0], size=out.shape[1])
    ramp = np.linspace(0, 1, len(out))[:, None]
    return out + (stds * ramp * signs * np.asarray(scale, np.float32)).astype(np.float32)


# ── Families ─────────────────────────────────────────────────────────────────────────────────────────

@dataclass(frozen=True)
class Family:
    """One failure at two strengths. `video`: changes the frames; otherwise `action` changes the labels;
    `needs`: "donor" (another episode's clip), "group" (a duplicate of the clip itself)."""

    name: str
    description: str
    levels: dict[str, float]
    video: Callable | None = None
    action: Callable | None = None
    needs: str | None = None


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("freeze", "the video stops: moves for the first part, then one frame repeated",
           {"weak": 0.6, "strong": 0.25}, video=freeze),
    Family("still_ramp", "nothing moves while the brightness ramps up slowly", {"weak": 0.08, "strong": 0.2},
           video=still_ramp),
    Family("flicker", "brightness alternates up and down every frame", {"weak": 0.08, "strong": 0.25}, video=flicker),
    Family("blur", "out of focus after frame 0", {"weak": 1 / 80, "strong": 1 / 40}, video=blurred),
    Family("exposure", "washed out after frame 0", {"weak": 0.25, "strong": 0.8}, video=overexposed),
    Family("colour", "colours drift at constant brightness (chroma turned by up to N degrees)",
           {"weak": 45.0, "strong": 120.0}, video=recoloured),
    Family("shuffle", "frame order lost: two local swaps / every frame permuted", {"weak": 2, "strong": 0},
           video=shuffled),
    Family("reverse", "time runs backwards: a rewind halfway / the whole clip backwards from a correct first frame",
           {"weak": 0.5, "strong": 0}, video=reversed_motion),
    Family("teleport", "an object jumps halfway: the busiest box swaps places with the box half a frame away",
           {"weak": 1 / 6, "strong": 1 / 4}, video=teleport),
    Family("vanish", "an object disappears halfway (filled in from its surroundings)", {"weak": 1 / 8, "strong": 1 / 4},
           video=vanish),
    Family("appear", "a copy of an object appears halfway and stays", {"weak": 1 / 8, "strong": 1 / 4}, video=appear),
    Family("cut", "the video cuts to another episode: for its last quarter / from frame 0 (wrong first frame)",
           {"weak": 0.75, "strong": 0.0}, needs="donor"),
    Family("noise", "Gaussian noise after frame 0 (sigma in gray levels)", {"weak": 4.0, "strong": 12.0}, video=noisy),
    Family("action_spike", "one label step jumps by N real stds and back", {"weak": 3.0, "strong": 6.0},
           action=action_spike),
    Family("action_drift", "labels drift away from the video, by N real stds at the end", {"weak": 1.0, "strong": 3.0},
           action=action_drift),
    Family("duplicate", "another seed of the same prompt that is a copy (noise sigma 2; weak: also shifted 1 px)",
           {"weak": 1.0, "strong": 0.0}, needs="group"),
]}

# The project's original corruption kinds, as (family, strength).
KIND_FAMILY: dict[str, tuple[str, str]] = {
    "frozen": ("freeze", "strong"), "flicker": ("flicker", "strong"), "blur": ("blur", "strong"),
    "overexposed": ("exposure", "strong"), "shuffled": ("shuffle", "strong"),
    "wrong_first_frame": ("cut", "strong"), "teleport": ("teleport", "strong"),
    "action_spike": ("action_spike", "strong"), "duplicate": ("duplicate", "strong"),
}


def corrupt_family(clip: Clip, family: str, strength: str, rng: np.random.Generator, donor: Clip | None = None,
                   action_scale: np.ndarray | None = None, kind: str | None = None) -> Clip:
    """A corrupted copy of a real clip, labelled `kind` (default "<family>/<strength>").

    meta["first_index"] says which frame of the original clip frame 0 now shows (0 but for a clip played
    backwards): a simulator replay must start from there."""
    if family not in FAMILIES:
        raise ValueError(f"unknown corruption family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    if strength not in spec.levels:
        raise ValueError(f"unknown strength {strength!r} for {family}; known: {sorted(spec.levels)}")
    level = spec.levels[strength]
    kind = kind or f"{family}/{strength}"
    frames = np.asarray(clip.frames)
    # Its own group: only "duplicate" should look like another seed of the same prompt.
    new = dataclasses.replace(clip, clip_id=f"{clip.clip_id}-{kind.replace('/', '-')}", kind=kind, disagreement=None,
                              extra_stats={}, group=f"{clip.clip_id}-{kind}", meta={**clip.meta, "first_index": 0})
    if spec.video is not None:
        new.frames = spec.video(frames, level, rng)
        if family == "reverse" and level == 0:
            new.first_frame, new.meta["first_index"] = frames[-1], len(frames) - 1
        return new
    if family == "cut":
        if donor is None:
            raise ValueError("the cut family needs a donor clip from another episode")
        t = int(round(len(frames) * level))
        new.frames = np.concatenate([frames[:t], np.asarray(donor.frames)[:len(frames) - t]])
        return new
    if family == "duplicate":
        noise = rng.normal(0, 2, frames.shape)
        dup = frames.astype(np.float32) + noise
        if level:
            dup = np.roll(dup, 1, axis=2)
        new.frames = np.clip(dup, 0, 255).astype(np.uint8)
        new.group, new.actions = clip.group, clip.actions
        return new
    if clip.actions is None or action_scale is None:
        raise ValueError(f"{family} needs the clip's actions and the real per-dim action scale")
    new.actions = spec.action(clip.actions, action_scale, rng, level)
    return new


def corrupt(clip: Clip, kind: str, rng: np.random.Generator, donor: Clip | None = None,
            action_scale: np.ndarray | None = None) -> Clip:
    """A corrupted copy of a real clip by one of the project's original kinds (see `TARGETS`). `donor`:
    another real clip (wrong_first_frame takes its video; duplicate copies it into the donor's group)."""
    if kind not in KIND_FAMILY:
        raise ValueError(f"unknown corruption {kind!r}; known: {sorted(TARGETS)}")
    family, strength = KIND_FAMILY[kind]
    if kind == "duplicate":
        if donor is None:
            raise ValueError("duplicate needs the donor clip it duplicates")
        return dataclasses.replace(corrupt_family(donor, family, strength, rng, kind=kind),
                                   clip_id=f"{clip.clip_id}-{kind}")
    if kind == "wrong_first_frame" and donor is None:
        raise ValueError("wrong_first_frame needs a donor clip from elsewhere (another episode)")
    return corrupt_family(clip, family, strength, rng, donor=donor, action_scale=action_scale, kind=kind)
