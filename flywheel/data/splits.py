"""Deterministic train/val/test split by episode, from what the episode recorded.

Each episode's split is a function of its own split key only (a hash mapped to [0, 1)). Ingest makes the
key from the episode's recorded frames (`flywheel.data.lerobot_source.split_key_of`: every data column but
the position, task numbering and refresh flag; a raw video's packets), so:
  - adding episodes never moves an existing one to another split: a val episode stays val forever, and
    nothing that was evaluated on leaks into training in a later iteration;
  - renaming the dataset folder, the domain or the files, or renumbering the episodes, moves nothing;
  - a refreshed version's real episodes keep their split (their frames are copied unchanged; a provenance
    file may also record the key), and the same recording twice lands in one split, never on both sides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")


def split_position(split_key: str) -> float:
    """Where an episode falls in [0, 1): the first 64 bits of sha256(split_key)."""
    digest = hashlib.sha256(split_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(split_key: str, val_fraction: float, test_fraction: float) -> str:
    u = split_position(split_key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(split_keys: Sequence[str], val_fraction: float = 0.1, test_fraction: float = 0.1) -> list[str]:
    """The split of each episode, in the order given.

    With very few episodes every one of them can hash into val/test; training needs at least one
    episode, so then the one nearest to the train range (highest position) goes to train instead.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: each must be in [0, 1) "
                         "and together below 1 so that train is not empty")
    splits = [split_of(k, val_fraction, test_fraction) for k in split_keys]
    if splits and "train" not in splits:
        nearest = max(range(len(split_keys)), key=lambda i: split_position(split_keys[i]))
        splits[nearest] = "train"
    return splits
