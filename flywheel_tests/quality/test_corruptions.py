"""The corruption families do what they say, on real PushT clips: each changes what it claims to change and
nothing it claims to keep, and the strong strength departs further from the real clip than the weak one."""

import numpy as np
import pytest

from flywheel.label import load_episodes
from flywheel.quality import real_clips
from flywheel.quality.corruptions import FAMILIES, KIND_FAMILY, TARGETS, corrupt, corrupt_family
from flywheel.quality.stats import gray


@pytest.fixture(scope="module")
def clips(pusht_root, episode_cache):
    episodes = load_episodes(pusht_root, [0, 1], image_size=64, cache_dir=episode_cache)
    return real_clips(episodes, num_frames=17, fps=16)


def _distance(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


def test_every_family_changes_its_clip_more_when_stronger(clips):
    clip, donor = clips[2], clips[-1]
    scale = np.ones(clip.actions.shape[1], np.float32)
    for family, spec in FAMILIES.items():
        out = {s: corrupt_family(clip, family, s, np.random.default_rng(0), donor=donor, action_scale=scale)
               for s in ("weak", "strong")}
        for strength, bad in out.items():
            assert bad.kind == f"{family}/{strength}" and bad.clip_id != clip.clip_id
            assert np.asarray(bad.frames).shape == np.asarray(clip.frames).shape and np.asarray(bad.frames).dtype == np.uint8
        if spec.action is not None:
            weak, strong = (_distance(out[s].actions, clip.actions) for s in ("weak", "strong"))
        elif family == "duplicate":
            assert out["strong"].group == clip.group  # another seed of the same prompt
            continue
        else:
            weak, strong = (_distance(out[s].frames, clip.frames) for s in ("weak", "strong"))
        assert 0 < strong, family
        if family not in ("reverse", "shuffle", "cut"):  # orderings and cuts: "stronger" is not "more pixels"
            assert weak < strong, (family, weak, strong)


def test_families_keep_what_they_claim_to_keep(clips):
    clip = clips[3]
    frames = np.asarray(clip.frames)
    rng = np.random.default_rng(1)
    colour = corrupt_family(clip, "colour", "strong", rng).frames
    # brightness preserved (up to rounding), colours moved
    luma_change = np.abs(gray(colour) - gray(frames)).mean()
    assert luma_change < 0.5 and _distance(colour, frames) > 5 * luma_change
    backwards = corrupt_family(clip, "reverse", "strong", rng)
    assert np.array_equal(backwards.frames, frames[::-1]) and np.array_equal(backwards.first_frame, frames[-1])
    assert backwards.meta["first_index"] == len(frames) - 1
    frozen = corrupt_family(clip, "freeze", "strong", rng).frames
    assert np.array_equal(frozen[4:], np.repeat(frames[3:4], len(frames) - 4, axis=0))
    for family in ("flicker", "blur", "exposure", "colour", "noise"):
        assert np.array_equal(corrupt_family(clip, family, "strong", rng).frames[0], frames[0]), family


def test_the_original_kinds_are_the_strong_strength_of_their_family(clips):
    assert set(KIND_FAMILY) == set(TARGETS)
    clip, donor = clips[0], clips[-1]
    scale = np.ones(clip.actions.shape[1], np.float32)
    for kind, (family, strength) in KIND_FAMILY.items():
        a = corrupt(clip, kind, np.random.default_rng(5), donor=clip if kind == "duplicate" else donor, action_scale=scale)
        b = corrupt_family(clip, family, strength, np.random.default_rng(5), donor=donor, action_scale=scale)
        assert a.kind == kind
        assert np.array_equal(a.frames, b.frames) and np.array_equal(a.actions, b.actions), kind
    with pytest.raises(ValueError, match="unknown corruption family"):
        corrupt_family(clip, "nope", "weak", np.random.default_rng(0))


def test_teleport_moves_an_object_not_two_patches_of_floor(clips):
    # PushT is mostly plain floor: two fixed boxes swapped there changed at most 10 pixels in 31 of 69 clips.
    from flywheel.quality.corruptions import _busiest_box

    clip = clips[2]
    frames = np.asarray(clip.frames)
    out = corrupt_family(clip, "teleport", "strong", np.random.default_rng(0)).frames
    t0, size = len(frames) // 2, 64 // 4
    y, x = _busiest_box(frames[t0], size)
    y2, x2 = (y + 32) % (64 - size), (x + 32) % (64 - size)
    assert np.array_equal(out[t0:, y2:y2 + size, x2:x2 + size], frames[t0:, y:y + size, x:x + size])
    assert np.array_equal(out[:t0], frames[:t0])
    # The object is what moved: many pixels change a lot, not a sliver.
    assert (np.abs(out[t0].astype(int) - frames[t0].astype(int)).max(-1) > 40).sum() > 50
