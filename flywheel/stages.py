"""One function per flywheel stage: plain arguments in, a `StageResult` out.

These are what the CLI, the workload entrypoints (Dagster Pipes) and the Dagster assets call; each
one delegates to its stage package (`flywheel.data`, `flywheel.train`, ...). Every result is an
immutable, content-addressed artifact under the flywheel home; running a stage again with the
same inputs returns the existing artifact (`reused=True`) instead of recomputing it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic

from flywheel.store import ArtifactStore, hash_json, verify_dir

Progress = Callable[[dict], None] | None
# Metadata keys whose values are paths on the flywheel home (rendered as paths in the Dagster UI).
PATH_KEYS = ("path", "preview", "latent_cache", "manifest", "clip_set", "adapter", "dataset_root")


@pydantic.dataclasses.dataclass
class StageResult:
    """What a stage made: its content-addressed artifact and the numbers worth showing (validated types).

    The one reader and writer of a stage's result: the Dagster asset's materialization metadata, a workload's
    Pipes report and the terminal all go through `as_metadata()` / `from_metadata()`.
    """

    stage: str
    key: str
    path: Path
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    preview: Path | None = None
    reused: bool = False

    def as_metadata(self) -> dict[str, Any]:
        """Flat, JSON-able metadata: the stage's numbers plus stage, key, path, reused and preview."""
        meta = {k: _jsonable(v) for k, v in self.metadata.items()}
        meta.update(stage=self.stage, key=self.key, path=str(self.path), reused=bool(self.reused))
        if self.preview:
            meta["preview"] = str(self.preview)
        return meta

    def as_dict(self) -> dict[str, Any]:
        return self.as_metadata()

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> StageResult:
        """Read back what `as_metadata` wrote (e.g. an upstream asset's latest materialization)."""
        preview = meta.get("preview")
        return cls(stage=str(meta["stage"]), key=str(meta["key"]), path=Path(meta["path"]), metadata=dict(meta),
                   preview=Path(preview) if preview else None, reused=bool(meta.get("reused", False)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep it readable ("nan") rather than dropping it
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _pipeline(model, vae_only: bool = False, transformer_only: bool = False):
    import torch

    from flywheel.model.presets import load_pipeline

    device = model.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_pipeline(model.preset, seed=model.seed, device=device, safety=model.safety, vae_only=vae_only,
                         transformer_only=transformer_only)


@contextlib.contextmanager
def claimed(store: ArtifactStore, kind: str, key: str):
    """Hold an artifact's key while deciding whether to build it and building it; yields whether it exists.

    A second process that wants the same artifact waits here and then reuses it instead of computing it again
    (and failing to rename its own copy into place). Under torchrun only rank 0 holds the key, and every rank
    acts on rank 0's answer, so the ranks of one job never disagree about whether to work."""
    from flywheel.train.distributed import current_world

    world = current_world()
    with store.lock(kind, key) if world.is_main else contextlib.nullcontext():
        exists = store.exists(kind, key)
        yield world.broadcast_object(exists) if world.is_distributed else exists


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
    from flywheel.data.latent_cache import LatentCache
    from flywheel.model.encode import LatentCacheResult, encode_clip_set, latent_cache_key
    from flywheel.model.presets import get_preset, resolved_preset

    store = ArtifactStore(home)
    manifest = load_manifest(manifest_path)
    preset = get_preset(model.preset)
    started = time.perf_counter()
    clip_set = prepare_clips(manifest.frame, manifest.key, store, clip_config, preset, progress=progress)
    cache_key = latent_cache_key(clip_set, resolved_preset(model.preset, seed=model.seed))
    pipe = None
    if store.exists("latents", cache_key):  # encoded before: no need to load the model (minutes for the 2B one)
        path = store.path("latents", cache_key)
        cache = LatentCacheResult(path, cache_key, LatentCache(path).meta, reused=True)
    else:
        pipe = _pipeline(model)
        cache = encode_clip_set(clip_set, pipe, store, progress=progress)
    fit = model_fit(store, cache_key, clip_set, lambda: pipe or _pipeline(model, vae_only=True))
    meta = {
        **clip_set.summary,
        "latent_cache": str(cache.path),
        "latent_cache_key": cache.key,
        **{f"cache_{k}": v for k, v in cache.summary.items() if isinstance(v, (int, float, str))},
        **fit,
        "seconds": round(time.perf_counter() - started, 2),
    }
    preview = clip_set.path / "preview.png"
    return StageResult("training_clips", clip_set.key, clip_set.path, meta, preview if preview.is_file() else None)


def model_fit(store: ArtifactStore, key: str, clip_set, load_pipe) -> dict[str, Any]:
    """How well the preset's VAE renders a sample of the clip set (flywheel.model.fit), measured once per clip set
    and model (`key`: the latent cache's) and kept as its own small artifact, so a reused cache reuses it too.
    The model-fit decision (flywheel.decisions) reads these numbers."""
    from flywheel.model.fit import clip_set_fit

    if not store.exists("fits", key):
        meta: dict = {}
        with store.write("fits", key, meta) as tmp:
            fit = clip_set_fit(load_pipe(), clip_set)
            (tmp / "fit.json").write_text(json.dumps(fit.as_dict(), indent=2, default=str))
            meta.update(fit.metadata())
    return store.meta("fits", key)


def train_stage(home, latent_cache_path, train_config, model, progress: Progress = None) -> StageResult:
    """adapter: LoRA/DoRA on the frozen transformer; resumes from its last checkpoint if interrupted."""
    from flywheel.data.latent_cache import LatentCache
    from flywheel.train.distributed import current_world
    from flywheel.train.lora import train_adapter

    store = ArtifactStore(home)
    cache = LatentCache(latent_cache_path)
    key = hash_json({"cache": Path(latent_cache_path).name, "train": train_config.model_dump(mode="json"),
                     "model": model.model_dump(mode="json", exclude={"device"})})[:24]
    path = store.path("adapters", key)
    with claimed(store, "adapters", key) as exists:
        if exists:
            return StageResult("adapter", key, path, store.meta("adapters", key), path / "loss.png", reused=True)
        # <home>/work/adapters-<key>: checkpoints a rerun resumes from; removed once the adapter exists (see store.working).
        with store.working("adapters", key) as work_dir:
            started = time.perf_counter()
            # Training reads the latent cache: the transformer alone is loaded (not the 7B text encoder, not the
            # VAE), so the training device holds what the step needs and nothing else.
            result = train_adapter(cache, _pipeline(model, transformer_only=True), train_config, work_dir,
                                   progress=progress)
            meta = {**{k: v for k, v in result.card.items() if isinstance(v, (int, float, str, bool))},
                    "seconds": round(time.perf_counter() - started, 2), "latent_cache": str(latent_cache_path),
                    **_training_mode_meta(result)}
            world = current_world()  # several GPUs (torchrun): every rank trained, rank 0 writes the artifact
            if world.is_main:
                with store.write("adapters", key, meta) as tmp:
                    shutil.copytree(result.adapter_dir, tmp, dirs_exist_ok=True)
            world.barrier()
        return StageResult("adapter", key, path, meta, path / "loss.png")


def _training_mode_meta(result) -> dict[str, Any]:
    """The training mode and the step times, flat (the stage's metadata; the card has the mode too)."""
    import statistics

    meta: dict[str, Any] = {}
    mode = result.training_mode
    if mode is not None:
        meta["training_mode"] = mode.activation_checkpointing + (f"({mode.selective_save})" if mode.selective_save else "")
        meta["training_mode_chosen_by"] = mode.chosen_by
        if mode.estimated_step_gib is not None:
            meta["estimated_step_gib"] = mode.estimated_step_gib
        if mode.free_gib is not None:
            meta["free_gpu_gib_at_start"] = mode.free_gib
    steps = result.step_seconds
    if steps:
        meta["first_step_s"] = round(steps[0], 3)  # includes compiling, on a GPU
        later = steps[2:] if len(steps) > 3 else steps[1:] or steps
        meta["step_s_median"] = round(statistics.median(later), 4)
    return meta


def evaluate_stage(home, adapter_path, clip_set_path, evaluate_config, model, progress: Progress = None,
                   generate_config=None, filter_config=None) -> StageResult:
    """adapter_evaluation: base vs adapter on held-out clips (PSNR/SSIM against the real frames)."""
    from flywheel.data.clips import load_clip_set
    from flywheel.generate.config import GenerateConfig
    from flywheel.generate.evaluation import evaluate_adapter

    store = ArtifactStore(home)
    generate_config = generate_config or GenerateConfig()
    key = hash_json({"adapter": Path(adapter_path).name, "clips": Path(clip_set_path).name,
                     "evaluate": evaluate_config.model_dump(mode="json", exclude={"adapter"}),
                     "generate": generate_config.model_dump(mode="json", exclude={"adapter"}),
                     "model": model.model_dump(mode="json", exclude={"device"}),
                     **({"filters": filter_config.model_dump(mode="json")} if filter_config else {})})[:24]
    path = store.path("evaluations", key)
    with claimed(store, "evaluations", key) as exists:
        if exists:
            return StageResult("adapter_evaluation", key, path, store.meta("evaluations", key), path / "comparison.png",
                               reused=True)
        verify_dir(adapter_path)  # the adapter evaluated is the one that was written (IntegrityError otherwise)
        clip_set = load_clip_set(clip_set_path)
        metrics: dict = {}  # filled inside; the store writes it as the artifact's metadata on completion
        with store.write("evaluations", key, metrics) as tmp:
            metrics.update(evaluate_adapter(_pipeline(model), Path(adapter_path), clip_set, evaluate_config, tmp,
                                            generate_config, progress=progress, filter_config=filter_config))
        return StageResult("adapter_evaluation", key, path, metrics, path / "comparison.png")


def generate_stage(home, adapter_path, clip_set_path, generate_config, model, progress: Progress = None,
                   split: str = "train") -> StageResult:
    """synthetic_videos: image-to-world from clip first frames, with the adapter (or the base when None)."""
    from flywheel.data.clips import load_clip_set
    from flywheel.generate.world import generate_videos, requests_from_clips, unload_adapters
    from flywheel.train.distributed import current_world

    store = ArtifactStore(home)
    key = hash_json({"format": 2, "adapter": Path(adapter_path).name if adapter_path else None,
                     "clips": Path(clip_set_path).name,
                     "split": split, "generate": generate_config.model_dump(mode="json", exclude={"adapter"}),
                     "model": model.model_dump(mode="json", exclude={"device"})})[:24]
    path = store.path("synthetic", key)
    with claimed(store, "synthetic", key) as exists:
        if exists:
            return StageResult("synthetic_videos", key, path, store.meta("synthetic", key), path / "contact_sheet.png",
                               reused=True)
        clip_set = load_clip_set(clip_set_path)
        clips = clip_set.frame[clip_set.frame["split"] == split]
        if adapter_path:
            verify_dir(adapter_path)  # generate with the adapter that was written (IntegrityError otherwise)
        adapter_name = "adapter" if adapter_path else None
        requests = requests_from_clips(clips, clip_set.path, generate_config, adapter_name)
        if generate_config.max_videos:
            requests = requests[: generate_config.max_videos]
        if not requests:
            raise ValueError(f"{clip_set.path}: no {split!r} clips to generate from")
        pipe = _pipeline(model)
        adapters = {adapter_name: Path(adapter_path)} if adapter_path else None
        world = current_world()
        if not world.is_main:  # several GPUs (torchrun): this rank's share of the videos, into rank 0's directory
            try:
                generate_videos(pipe, requests, None, generate_config, adapters=adapters, progress=progress)
            finally:
                unload_adapters(pipe)
            world.barrier()  # rank 0 has written the artifact
            return StageResult("synthetic_videos", key, path, store.meta("synthetic", key), path / "contact_sheet.png")
        started = time.perf_counter()
        meta: dict = {}
        with store.write("synthetic", key, meta) as tmp:
            out = tmp / "out"
            try:
                result = generate_videos(pipe, requests, out, generate_config, adapters=adapters, progress=progress)
            finally:
                unload_adapters(pipe)
            for item in out.iterdir():
                item.rename(tmp / item.name)
            out.rmdir()
            _keep_first_frames(tmp, requests)
            meta.update({"videos": len(result.frame), "adapter": str(adapter_path) if adapter_path else "base",
                    "seeds": list(generate_config.seeds), "seconds": round(time.perf_counter() - started, 2),
                    "seconds_per_video": round((time.perf_counter() - started) / max(len(result.frame), 1), 2),
                    **pipe.flywheel_safety})
            (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2))
        world.barrier()
        return StageResult("synthetic_videos", key, path, meta, path / "contact_sheet.png")


def _keep_first_frames(synthetic_dir: Path, requests) -> None:
    """Copy each request's conditioning frame into the synthetic set, so the set is self-contained
    (the first-frame fidelity filter compares against it)."""
    import pandas as pd

    (synthetic_dir / "first_frames").mkdir()
    by_id = {r.request_id: r for r in requests}
    samples = pd.read_parquet(synthetic_dir / "samples.parquet")
    for request_id in samples["request_id"]:
        shutil.copyfile(by_id[request_id].first_frame, synthetic_dir / "first_frames" / f"{request_id}.png")
    samples["first_frame"] = [f"first_frames/{r}.png" for r in samples["request_id"]]
    samples.to_parquet(synthetic_dir / "samples.parquet", index=False)


def _dataset_root(manifest) -> Path:
    roots = manifest.frame["dataset_root"].unique()
    if len(roots) != 1 or not manifest.frame["source"].str.startswith("lerobot").all():
        raise ValueError(f"{manifest.path}: labelling and refresh need one LeRobot dataset as the domain's "
                         f"demonstrations; this manifest has sources {sorted(manifest.frame['source'].unique())}")
    return Path(roots[0])


def _episode_indices(manifest, splits: tuple[str, ...]) -> list[int]:
    return sorted(int(i) for i in manifest.frame.loc[manifest.frame["split"].isin(splits), "episode_index"])


def idm_stage(home, manifest_path, idm_config, progress: Progress = None, model=None,
              clip_config=None) -> StageResult:
    """The domain's inverse dynamics model, trained on the manifest's train episodes, scored on val+test; with
    idm_config.codec_augment and `model`, also on the train episodes as that model's codec renders them."""
    from flywheel.data.ingest import load_manifest
    from flywheel.label.idm import train_idm

    store = ArtifactStore(home)
    manifest = load_manifest(manifest_path)
    train, held_out = _episode_indices(manifest, ("train",)), _episode_indices(manifest, ("val", "test"))
    if not held_out:  # a tiny dataset: hold out the last train episode rather than score on training data
        train, held_out = train[:-1], train[-1:]
    config = idm_config.model_copy(update={"episodes": train + held_out, "val_episodes": held_out})
    codec = config.codec_augment and model is not None
    clip_shape = _generated_clip_shape(model, clip_config) if codec else None
    key = hash_json({"manifest": manifest.key, "idm": config.model_dump(mode="json"),
                     **({"codec": model.model_dump(mode="json", exclude={"device"}), "clip": clip_shape}
                        if codec else {})})[:24]
    path = store.path("idm", key)
    with claimed(store, "idm", key) as exists:
        if exists:
            return StageResult("idm", key, path, store.meta("idm", key), path / "pred_vs_true.png", reused=True)
        meta: dict = {}
        with store.write("idm", key, meta) as tmp:
            result = train_idm(_dataset_root(manifest), config, tmp, progress=progress,
                               **({"codec": _through_model_codec(model), "codec_clip": clip_shape} if codec else {}))
            meta.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))})
            codec_meta = result.metrics["codec_augment"]
            meta["codec_augment"] = codec_meta["used"]
            if "val_mae_mean" in codec_meta:  # its error on held-out episodes as the codec renders them
                meta["mae_mean_through_codec"] = codec_meta["val_mae_mean"]
            if "reason" in codec_meta:
                meta["codec_augment_reason"] = codec_meta["reason"]
        return StageResult("idm", key, path, meta, path / "pred_vs_true.png")


def label_stage(home, synthetic_path, manifest_path, label_config, progress: Progress = None,
                model=None, clip_config=None) -> StageResult:
    """pseudo_actions: every synthetic video labelled by the domain's IDM (sliding window + disagreement);
    `model`/`clip_config`: the world model that generated them and its clips, whose codec the IDM also
    trains through (idm_stage)."""
    import numpy as np
    import pandas as pd

    from flywheel.data.video import read_frames
    from flywheel.label.idm import InverseDynamicsModel
    from flywheel.label.labeling import label_video

    store = ArtifactStore(home)
    idm = idm_stage(home, manifest_path, label_config.idm, progress, model=model, clip_config=clip_config)
    key = hash_json({"synthetic": Path(synthetic_path).name, "idm": idm.key,
                     "window": label_config.window.model_dump(mode="json")})[:24]
    path = store.path("labels", key)
    with claimed(store, "labels", key) as exists:
        if exists:
            return StageResult("pseudo_actions", key, path, store.meta("labels", key), idm.preview, reused=True)
        samples = pd.read_parquet(Path(synthetic_path) / "samples.parquet")
        model = InverseDynamicsModel.load(idm.path)
        meta: dict = {}
        with store.write("labels", key, meta) as tmp:
            (tmp / "actions").mkdir()
            rows = []
            for i, sample in enumerate(samples.itertuples()):
                frames = read_frames(Path(synthetic_path) / sample.video)
                actions, disagreement = label_video(model, frames, float(sample.fps), label_config.window)
                np.savez(tmp / "actions" / f"{sample.request_id}.npz", actions=actions, disagreement=disagreement)
                rows.append({"request_id": sample.request_id, "actions": f"actions/{sample.request_id}.npz",
                             "num_frames": len(frames), "fps": float(sample.fps),
                             "mean_disagreement": float(np.mean(disagreement))})
                if progress:
                    progress({"stage": "label", "done": i + 1, "total": len(samples)})
            table = pd.DataFrame(rows)
            table.to_parquet(tmp / "labels.parquet", index=False)
            (tmp / "labels.json").write_text(json.dumps({"synthetic": str(synthetic_path), "idm": str(idm.path)}))
            meta.update({"videos": len(table), "mean_disagreement": float(table["mean_disagreement"].mean()),
                         "idm": str(idm.path), "idm_mae_mean": idm.metadata.get("mae_mean"),
                         "idm_baseline_mae_mean": idm.metadata.get("baseline_mae_mean"),
                         "idm_codec_augment": idm.metadata.get("codec_augment"),
                         "idm_mae_mean_through_codec": idm.metadata.get("mae_mean_through_codec"),
                         "synthetic": str(synthetic_path)})
        return StageResult("pseudo_actions", key, path, meta, idm.preview)


def _synthetic_clips(labels_path: Path):
    """(labels meta, samples joined with labels, synthetic dir, idm dir) of a pseudo_actions artifact."""
    import pandas as pd

    links = json.loads((labels_path / "labels.json").read_text())
    synthetic = Path(links["synthetic"])
    table = pd.read_parquet(synthetic / "samples.parquet").merge(
        pd.read_parquet(labels_path / "labels.parquet"), on="request_id", suffixes=("", "_label"))
    return table, synthetic, Path(links["idm"])


def curate_stage(home, labels_path, manifest_path, filter_config, progress: Progress = None,
                 model=None) -> StageResult:
    """curated_trajectories: the filter stack (flywheel.quality.curation.curate), thresholds calibrated on
    held-out real episodes (as the base model's codec renders them when filter_config.calibrate_on is
    "model_codec"; `model` names it).

    Rejected clips stay in the artifact with every score and the reasons they failed."""
    from flywheel.data.ingest import load_manifest
    from flywheel.quality.config import FILTER_VERSION
    from flywheel.quality.curation import curate

    store = ArtifactStore(home)
    labels_path = Path(labels_path)
    codec = filter_config.calibrate_on == "model_codec"
    if codec and model is None:
        raise ValueError("quality.calibrate_on is 'model_codec': curate_stage needs the model config whose VAE "
                         "renders the calibration clips (pass model=...)")
    key = hash_json({"labels": labels_path.name, "manifest": Path(manifest_path).name,
                     "filters": filter_config.model_dump(mode="json"), "filter_version": FILTER_VERSION,
                     **({"codec": model.model_dump(mode="json", exclude={"device"})} if codec else {})})[:24]
    path = store.path("curated", key)
    if store.exists("curated", key):
        return StageResult("curated_trajectories", key, path, store.meta("curated", key), path / "scores.png",
                           reused=True)
    manifest = load_manifest(manifest_path)
    held_out = _episode_indices(manifest, ("val", "test")) or _episode_indices(manifest, ("train",))[-1:]
    train = _episode_indices(manifest, ("train",))
    meta: dict = {}
    with store.write("curated", key, meta) as tmp:
        meta.update(curate(tmp, labels_path, _dataset_root(manifest), held_out, train, filter_config,
                           codec=_through_model_codec(model) if codec else None, progress=progress))
    return StageResult("curated_trajectories", key, path, meta, path / "scores.png")


def _generated_clip_shape(model, clip_config) -> tuple[int, float]:
    """(frames, fps) of the clips the model generates: the training clips' (clips config over its preset)."""
    from flywheel.data.clips import ClipConfig, resolve_spec
    from flywheel.model.presets import get_preset

    spec = resolve_spec(clip_config or ClipConfig(), get_preset(model.preset))
    return spec.num_frames, float(spec.fps)


def _through_model_codec(model):
    """The base model's codec (VAE encode to the posterior mean, decode) as a function of a list of clips;
    the VAE is loaded on first use, without the 2B model's 7B text encoder."""
    pipe = None

    def roundtrip(clips: list) -> list:
        nonlocal pipe
        from flywheel.model.encode import codec_roundtrips

        pipe = pipe or _pipeline(model, vae_only=True)
        return codec_roundtrips(pipe, clips)

    return roundtrip


def refresh_stage(home, curated_path, manifest_path, refresh_config, progress: Progress = None,
                  clip_resize: str | None = None) -> StageResult:
    """refreshed_dataset: a new LeRobot v3.0 version = real episodes + accepted synthetic ones (+ usefulness).
    `clip_resize`: the clips stage's `clips.resize` (a "pad" clip's bars are cut before the camera-size resize)."""
    import numpy as np
    import pandas as pd

    from flywheel.data.ingest import load_manifest
    from flywheel.data.video import read_frames
    from flywheel.refresh.dataset import SyntheticEpisode, refresh_dataset
    from flywheel.refresh.usefulness import usefulness_report

    store = ArtifactStore(home)
    curated_path = Path(curated_path)
    manifest = load_manifest(manifest_path)
    root = _dataset_root(manifest)
    links = json.loads((curated_path / "curated.json").read_text())
    table, synthetic, _ = _synthetic_clips(Path(links["labels"]))
    results = pd.read_parquet(curated_path / "results.parquet").set_index("clip_id")
    accepted = table[table["request_id"].map(results["accepted"])]
    score_cols = [c for c in results.columns if results[c].dtype.kind == "f"]
    episodes, not_refreshable = [], []
    for row in accepted.itertuples():
        z = np.load(Path(links["labels"]) / row.actions)
        # keys, not paths: the version's content (and id) must not depend on where the home is
        provenance = {"clip_id": row.request_id, "adapter_version": Path(row.adapter_path).name if row.adapter_path
                      else "base", "adapter": row.adapter,
                      "seed": int(row.seed), "prompt": row.prompt, "source_episode": row.source_episode_id,
                      "source_clip": row.source_clip_id, "model_id": row.model_id, "revision": row.revision,
                      "synthetic_set": synthetic.name,
                      # to 6 significant digits: OpenCV's optical flow and the simulator differ in the last bits
                      # between runs, and the version id must not (it hashes the provenance)
                      "filter_scores": {c: float(f"{float(results.loc[row.request_id, c]):.6g}") for c in score_cols}}
        features = _simulator_features(root, row, z["actions"], float(row.fps))
        if features is None:
            not_refreshable.append(row.request_id)
            continue
        episodes.append(SyntheticEpisode(frames=read_frames(synthetic / row.video), actions=z["actions"],
                                         fps=float(row.fps), provenance=provenance, features=features))
    base_ids = manifest.frame.sort_values("episode_index")["episode_id"].tolist()
    version, dataset_root = refresh_dataset(root, episodes, store, refresh_config.dataset, progress=progress,
                                            base_episode_ids=base_ids, clip_resize=clip_resize)
    meta = {"version_id": version, "dataset_root": str(dataset_root), "real_episodes": int(manifest.frame.shape[0]),
            "synthetic_episodes": len(episodes), "base_root": str(root),
            "accepted_but_not_refreshable": len(not_refreshable)}
    preview = None
    if episodes and refresh_config.usefulness_report:
        # Scored on the manifest's held-out real episodes (they keep their indices in the new version); a
        # manifest without any: the report's own fallback, recorded in it.
        held_out = _episode_indices(manifest, ("val", "test")) or None
        report_key = hash_json({"usefulness": refresh_config.usefulness.model_dump(mode="json"),
                                "held_out": held_out})[:8]
        report_dir = store.home / "reports" / "usefulness" / f"{version}-{report_key}"
        if not (report_dir / "usefulness.json").is_file():
            usefulness_report(dataset_root, refresh_config.usefulness, report_dir, progress=progress, held_out=held_out)
        summary = json.loads((report_dir / "usefulness.json").read_text())
        low, high = summary["paired_difference"]["relative_ci95"]
        meta.update({"usefulness_gate_passed": bool(summary["gate_passed"]), "usefulness_verdict": summary["verdict"],
                     "usefulness_change": summary["relative_change"], "usefulness_ci95_low": low,
                     "usefulness_ci95_high": high, "usefulness_margin": summary["margin"],
                     "usefulness_seeds": len(summary["seeds"]), "usefulness_report": str(report_dir)})
        preview = report_dir / "usefulness.png"
    else:
        meta["usefulness_gate_passed"] = True
        meta["usefulness_note"] = "no synthetic episode accepted: the new version equals the real data"
    return StageResult("refreshed_dataset", version, dataset_root, meta, preview)


def _simulator_features(root: Path, row, actions, fps: float) -> dict | None:
    """Per-frame features a video cannot carry, from the domain's simulator when it has one
    (flywheel.simulation; the PushT sample's `observation.environment_state`), replayed from where the source
    clip starts. Other domains need nothing here ({}); a clip whose start is unknown (a synthetic source
    episode, an episode the simulator never recorded) returns None."""
    from flywheel.label.episodes import dataset_info
    from flywheel.simulation import generated_clip_start, simulation_for

    simulation = simulation_for(root)
    if simulation is None:
        return {}
    start = generated_clip_start(simulation, root, float(dataset_info(root)["fps"]), row.source_episode_id,
                                 row.source_clip_id, fps)
    return None if start is None else simulation.replayed_features(start, actions, fps)


def policy_stage(home, refreshed_path, refreshed_meta: dict, policy_config, device: str | None = None,
                 progress: Progress = None) -> StageResult:
    """policy_evaluation: the same LeRobot policy trained on the iteration's input version (real: the version the
    refresh started from, `base_root`) and on the refreshed one, rolled out closed-loop in the domain's simulator (flywheel.policy.compare_arms). Where it
    does not run (policy.evaluate off, auto without a GPU, no simulator, nothing synthetic) the result says
    "not evaluated" and why; the build-on decision reads either (flywheel.decisions)."""
    from flywheel.policy.compare import compare_arms
    from flywheel.policy.iteration import comparison_metadata, resolve_device, why_not_evaluated

    store = ArtifactStore(home)
    real_root = Path(refreshed_meta["base_root"])
    refreshed_root = Path(refreshed_meta.get("dataset_root") or refreshed_path)
    device = resolve_device(device)
    synthetic = int(refreshed_meta.get("synthetic_episodes", 0) or 0)
    reason = why_not_evaluated(policy_config, device, real_root, synthetic)
    comparison = policy_config.comparison(device)
    # the refreshed version's id covers its base version's content too
    key = hash_json({"refreshed": refreshed_root.name,
                     "config": comparison.model_dump(mode="json", exclude={"device"}), "skipped": reason})[:24]
    path = store.path("policy_evaluations", key)
    with claimed(store, "policy_evaluations", key) as exists:
        if exists:
            meta = store.meta("policy_evaluations", key)
            preview = path / "contact_sheet.png"
            return StageResult("policy_evaluation", key, path, meta, preview if preview.is_file() else None, True)
        meta: dict = {"evaluated": False, "device": device, "cpu_minutes_estimate": round(policy_config.cpu_minutes(), 1),
                      "real_root": str(real_root), "refreshed_root": str(refreshed_root)}
        with store.write("policy_evaluations", key, meta) as tmp:
            if reason is not None:
                meta["not_evaluated"] = reason
                report = {"evaluated": False, "reason": reason, **meta, "config": comparison.model_dump(mode="json")}
                (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            else:
                started = time.perf_counter()
                meta.update(comparison_metadata(compare_arms(real_root, refreshed_root, comparison, tmp,
                                                             progress=progress)))
                meta["seconds"] = round(time.perf_counter() - started, 1)
        preview = path / "contact_sheet.png"
        return StageResult("policy_evaluation", key, path, meta, preview if preview.is_file() else None)
