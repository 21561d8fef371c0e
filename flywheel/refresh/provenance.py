"""Provenance of a refreshed dataset: one row per episode saying where it came from.

`provenance.parquet` at the dataset root: episode_index, episode_id (what ingest calls the episode: a real
one keeps the id it had in the first dataset, so its split never changes; a synthetic one is
"synthetic/<version that added it>/<clip_id>"), is_synthetic, and for synthetic episodes
clip_id, adapter_version, seed, prompt, source_episode, filter_scores (JSON); real episodes carry
base_episode (their index in the base dataset). `provenance.json`: version id, base dataset and hash,
counts. LeRobot ignores both files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd

from flywheel.store import atomic_write_bytes

PROVENANCE_PARQUET = "provenance.parquet"
PROVENANCE_JSON = "provenance.json"
SYNTHETIC_FIELDS = ("clip_id", "adapter_version", "seed", "prompt", "source_episode", "filter_scores")


def provenance_table(num_real: int, synthetic: list[dict], base_provenance: pd.DataFrame | None = None,
                     base_episode_ids: list[str] | None = None, version_id: str = "") -> pd.DataFrame:
    if base_episode_ids is not None and len(base_episode_ids) != num_real:
        raise ValueError(f"{len(base_episode_ids)} base episode ids for {num_real} base episodes")
    rows = []
    for i in range(num_real):
        inherited = {}
        if base_provenance is not None and i in set(base_provenance["episode_index"]):
            inherited = base_provenance.set_index("episode_index").loc[i].to_dict()
        if not isinstance(inherited.get("episode_id"), str):
            inherited["episode_id"] = base_episode_ids[i] if base_episode_ids is not None else None
        rows.append({**{k: None for k in SYNTHETIC_FIELDS}, "is_synthetic": False, "base_episode": i, **inherited,
                     "episode_index": i})
    for j, p in enumerate(synthetic):
        row = {k: p.get(k) for k in SYNTHETIC_FIELDS}
        row["filter_scores"] = json.dumps(p.get("filter_scores") or {}, sort_keys=True, default=float)
        row["seed"] = None if row["seed"] is None else int(row["seed"])
        for k in ("adapter_version", "prompt", "source_episode", "clip_id"):
            row[k] = None if row[k] is None else str(row[k])
        rows.append({**row, "is_synthetic": True, "base_episode": None, "episode_index": num_real + j,
                     "episode_id": f"synthetic/{version_id}/{row['clip_id']}"})
    df = pd.DataFrame(rows)
    df["base_episode"] = df["base_episode"].astype("Int64")
    df["seed"] = df["seed"].astype("Int64")
    df["episode_id"] = df["episode_id"].astype(object)
    return df[["episode_index", "episode_id", "is_synthetic", "base_episode", *SYNTHETIC_FIELDS]]


def write_provenance(root: str | Path, table: pd.DataFrame, summary: dict) -> None:
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    atomic_write_bytes(Path(root) / PROVENANCE_PARQUET, buf.getvalue())
    atomic_write_bytes(Path(root) / PROVENANCE_JSON, json.dumps(summary, indent=2, sort_keys=True, default=str).encode())


def read_provenance(root: str | Path) -> pd.DataFrame | None:
    path = Path(root) / PROVENANCE_PARQUET
    return pd.read_parquet(path) if path.is_file() else None
