"""Deterministic train/val/test split by episode.

Each episode's split is a function of its own `episode_id` only (a hash mapped to [0, 1)), so adding
episodes never moves an existing one to another split: a val episode stays val forever, and nothing
that was evaluated on leaks into training in a later iteration.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def split_position(episode_id: str) -> float:
    """Where an episode falls in [0, 1): the first 64 bits of sha256(episode_id)."""
    digest = hashlib.sha256(episode_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(episode_id: str, val_fraction: float, test_fraction: float) -> str:
    u = split_position(episode_id)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(episode_ids: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[str]:
    """The split of each episode, in the order given.

    With very few episodes every one of them can hash into val/test; training needs at least one
    episode, so then the one nearest to the train range (highest position) goes to train instead.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
                         "and together below 1 so that train is not empty")
    splits = [split_of(e, val_fraction, test_fraction) for e in episode_ids]
    if splits and "train" not in splits:
        nearest = max(range(len(episode_ids)), key=lambda i: split_position(episode_ids[i]))
        splits[nearest] = "train"
    return splits
