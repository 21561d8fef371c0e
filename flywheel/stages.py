"""One function per flywheel stage: plain arguments in, a `StageResult` out.

These are what the CLI, the workload entrypoints (Dagster Pipes) and the Dagster assets call; each
one delegates to its stage package (`flywheel.data`, `flywheel.train`, ...). Every result is an
immutable, content-addressed artifact under the flywheel home; running a stage again with the
same inputs returns the existing artifact (`reused=True`) instead of recomputing it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flywheel.store import ArtifactStore, hash_json

Progress = Callable[[dict], None] | None


@dataclasses.dataclass
class StageResult:
    stage: str
    key: str
    path: Path
    metadata: dict[str, Any]
    preview: Path | None = None
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["preview"] = str(self.preview) if self.preview else None
        return d


def _pipeline(model):
    import torch

    from flywheel.model.presets import load_pipeline

    device = model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pipeline(model.preset, seed=model.seed, device=device, safety=model.safety)


def ingest_stage(home, config, progress: Progress = None) -> StageResult:
    """demonstrations: a LeRobot v3.0 / v2.1 dataset or a raw video folder -> episode manifest."""
    from flywheel.data.ingest import ingest

    store = ArtifactStore(home)
    started = time.perf_counter()
    manifest = ingest(config, store, progress=progress)
    meta = {**manifest.summary, "seconds": round(time.perf_counter() - started, 2)}
    return StageResult("demonstrations", manifest.key, manifest.path, meta)


def clips_stage(home, manifest_path, clip_config, model, progress: Progress = None) -> StageResult:
    """training_clips: episodes -> fixed-size clips + cached VAE latents and text embeddings."""
    from flywheel.data.clips import prepare_clips
    from flywheel.data.ingest import load_manifest
    from flywheel.model.encode import encode_clip_set
    from flywheel.model.presets import get_preset

    store = ArtifactStore(home)
    manifest = load_manifest(manifest_path)
    preset = get_preset(model.preset)
    started = time.perf_counter()
    clip_set = prepare_clips(manifest.frame, manifest.key, store, clip_config, preset, progress=progress)
    cache = encode_clip_set(clip_set, _pipeline(model), store, progress=progress)
    meta = {
        **clip_set.summary,
        "latent_cache": str(cache.path),
        "latent_cache_key": cache.key,
        **{f"cache_{k}": v for k, v in cache.summary.items() if isinstance(v, (int, float, str))},
        "seconds": round(time.perf_counter() - started, 2),
    }
    preview = clip_set.path / "preview.png"
    return StageResult("training_clips", clip_set.key, clip_set.path, meta, preview if preview.is_file() else None)


def train_stage(home, latent_cache_path, train_config, model, progress: Progress = None) -> StageResult:
    """adapter: LoRA/DoRA on the frozen transformer; resumes from its last checkpoint if interrupted."""
    from flywheel.data.latent_cache import LatentCache
    from flywheel.train.lora import train_adapter

    store = ArtifactStore(home)
    cache = LatentCache(latent_cache_path)
    key = hash_json({"cache": Path(latent_cache_path).name, "train": train_config.model_dump(mode="json"),
                     "model": model.model_dump(mode="json", exclude={"device"})})[:24]
    path = store.path("adapters", key)
    if store.exists("adapters", key):
        return StageResult("adapter", key, path, store.meta("adapters", key), path / "loss.png", reused=True)
    work_dir = store.home / "work" / f"train-{key}"
    started = time.perf_counter()
    result = train_adapter(cache, _pipeline(model), train_config, work_dir, progress=progress)
    meta = {**{k: v for k, v in result.card.items() if isinstance(v, (int, float, str, bool))},
            "seconds": round(time.perf_counter() - started, 2), "latent_cache": str(latent_cache_path)}
    with store.write("adapters", key, meta) as tmp:
        shutil.copytree(result.adapter_dir, tmp, dirs_exist_ok=True)
    shutil.rmtree(work_dir, ignore_errors=True)
    return StageResult("adapter", key, path, meta, path / "loss.png")


def evaluate_stage(home, adapter_path, clip_set_path, evaluate_config, model, progress: Progress = None,
                   generate_config=None) -> StageResult:
    """adapter_evaluation: base vs adapter on held-out clips (PSNR/SSIM against the real frames)."""
    from flywheel.data.clips import load_clip_set
    from flywheel.generate.config import GenerateConfig
    from flywheel.generate.evaluation import evaluate_adapter

    store = ArtifactStore(home)
    generate_config = generate_config or GenerateConfig()
    key = hash_json({"adapter": Path(adapter_path).name, "clips": Path(clip_set_path).name,
                     "evaluate": evaluate_config.model_dump(mode="json"),
                     "generate": generate_config.model_dump(mode="json"),
                     "model": model.model_dump(mode="json", exclude={"device"})})[:24]
    path = store.path("evaluations", key)
    if store.exists("evaluations", key):
        return StageResult("adapter_evaluation", key, path, store.meta("evaluations", key), path / "comparison.png",
                           reused=True)
    clip_set = load_clip_set(clip_set_path)
    metrics: dict = {}  # filled inside; the store writes it as the artifact's metadata on completion
    with store.write("evaluations", key, metrics) as tmp:
        metrics.update(evaluate_adapter(_pipeline(model), Path(adapter_path), clip_set, evaluate_config, tmp,
                                        generate_config, progress=progress))
    return StageResult("adapter_evaluation", key, path, metrics, path / "comparison.png")


def generate_stage(home, adapter_path, clip_set_path, generate_config, model, progress: Progress = None,
                   split: str = "train") -> StageResult:
    """synthetic_videos: image-to-world from clip first frames, with the adapter (or the base when None)."""
    from flywheel.data.clips import load_clip_set
    from flywheel.generate.world import generate_videos, requests_from_clips, unload_adapters

    store = ArtifactStore(home)
    key = hash_json({"adapter": Path(adapter_path).name if adapter_path else None, "clips": Path(clip_set_path).name,
                     "split": split, "generate": generate_config.model_dump(mode="json"),
                     "model": model.model_dump(mode="json", exclude={"device"})})[:24]
    path = store.path("synthetic", key)
    if store.exists("synthetic", key):
        return StageResult("synthetic_videos", key, path, store.meta("synthetic", key), path / "contact_sheet.png",
                           reused=True)
    clip_set = load_clip_set(clip_set_path)
    clips = clip_set.frame[clip_set.frame["split"] == split]
    adapter_name = "adapter" if adapter_path else None
    requests = requests_from_clips(clips, clip_set.path, generate_config, adapter_name)
    if generate_config.max_videos:
        requests = requests[: generate_config.max_videos]
    if not requests:
        raise ValueError(f"{clip_set.path}: no {split!r} clips to generate from")
    pipe = _pipeline(model)
    started = time.perf_counter()
    meta: dict = {}
    with store.write("synthetic", key, meta) as tmp:
        out = tmp / "out"
        try:
            result = generate_videos(pipe, requests, out, generate_config,
                                     adapters={adapter_name: Path(adapter_path)} if adapter_path else None,
                                     progress=progress)
        finally:
            unload_adapters(pipe)
        for item in out.iterdir():
            item.rename(tmp / item.name)
        out.rmdir()
        meta.update({"videos": len(result.frame), "adapter": str(adapter_path) if adapter_path else "base",
                "seeds": list(generate_config.seeds), "seconds": round(time.perf_counter() - started, 2),
                "seconds_per_video": round((time.perf_counter() - started) / max(len(result.frame), 1), 2),
                **pipe.flywheel_safety})
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return StageResult("synthetic_videos", key, path, meta, path / "contact_sheet.png")
