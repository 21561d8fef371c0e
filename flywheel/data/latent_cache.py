"""The latent/embedding cache: what a training step reads instead of running the VAE and text encoder.

Layout of one cache (an artifact `<home>/latents/<key>/`, key = clip set hash + model id +
revision + resolution + frames):

    index.parquet          clip_id, split, prompt, prompt_hash, latent_file, embed_file
    latents/<clip_id>.safetensors   {"latent": float32 [C, T', H', W']}, Cosmos 2.5 normalised:
                                    (vae.encode(video).latent_dist.mean - latents_mean) / latents_std
    text/<prompt_hash>.safetensors  {"prompt_embeds": [L, D]}  (pipe._get_prompt_embeds, one per prompt)
    cache.json             model_id, revision, height, width, num_frames, fps, clip_set, counts

Writing goes through `LatentCacheWriter` inside an `ArtifactStore.write` temp dir.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from flywheel.store import hash_bytes

INDEX = "index.parquet"
META = "cache.json"


def prompt_hash(prompt: str) -> str:
    return hash_bytes(prompt.encode())[:16]


@dataclass
class TrainingSample:
    clip_id: str
    latent: torch.Tensor  # [C, T', H', W'] float32, normalised
    prompt_embeds: torch.Tensor  # [L, D]
    prompt: str


class LatentCacheWriter:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "latents").mkdir(parents=True, exist_ok=True)
        (self.root / "text").mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._prompts: set[str] = set()

    def has_prompt(self, prompt: str) -> bool:
        return prompt_hash(prompt) in self._prompts

    def add_prompt(self, prompt: str, prompt_embeds: torch.Tensor) -> str:
        h = prompt_hash(prompt)
        if h not in self._prompts:
            save_file({"prompt_embeds": prompt_embeds.detach().cpu().contiguous()}, self.root / "text" / f"{h}.safetensors")
            self._prompts.add(h)
        return h

    def add_clip(self, clip_id: str, split: str, prompt: str, latent: torch.Tensor) -> None:
        if prompt_hash(prompt) not in self._prompts:
            raise ValueError(f"clip {clip_id}: add the embedding of its prompt first (add_prompt)")
        latent_file = f"latents/{clip_id}.safetensors"
        save_file({"latent": latent.detach().float().cpu().contiguous()}, self.root / latent_file)
        self.rows.append(dict(clip_id=clip_id, split=split, prompt=prompt, prompt_hash=prompt_hash(prompt),
                              latent_file=latent_file, embed_file=f"text/{prompt_hash(prompt)}.safetensors"))

    def finish(self, meta: dict) -> None:
        if not self.rows:
            raise ValueError("latent cache is empty: no clips were encoded")
        pd.DataFrame(self.rows).to_parquet(self.root / INDEX, index=False)
        (self.root / META).write_text(json.dumps({**meta, "num_clips": len(self.rows),
                                                  "num_prompts": len(self._prompts)}, indent=2, sort_keys=True))


class LatentCache:
    """Read side: the training loop's dataset."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / INDEX).is_file():
            raise FileNotFoundError(f"{self.root}: not a latent cache (no {INDEX}); run the clips stage first")
        self.index = pd.read_parquet(self.root / INDEX)
        self.meta = json.loads((self.root / META).read_text())
        self._embeds: dict[str, torch.Tensor] = {}

    def clip_ids(self, split: str | None = "train") -> list[str]:
        rows = self.index if split is None else self.index[self.index["split"] == split]
        return list(rows["clip_id"])

    def load(self, clip_id: str) -> TrainingSample:
        row = self.index.loc[self.index["clip_id"] == clip_id].iloc[0]
        if row["embed_file"] not in self._embeds:
            self._embeds[row["embed_file"]] = load_file(self.root / row["embed_file"])["prompt_embeds"]
        latent = load_file(self.root / row["latent_file"])["latent"]
        return TrainingSample(clip_id, latent, self._embeds[row["embed_file"]], row["prompt"])

    def __len__(self) -> int:
        return len(self.index)
