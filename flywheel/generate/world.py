"""Image-to-world generation: (first frame, prompt, seed) -> video, with the base model or a LoRA adapter.

Several adapters share one frozen base pipeline. Each adapter is loaded once (stock
`pipe.load_lora_weights`) and requests are run grouped by adapter, switching with
`pipe.set_adapters` / `pipe.disable_lora` (base) — the base weights are never reloaded or copied.
Each unique prompt is encoded once per call and its embeddings are reused for every seed/adapter.

Output directory (written into a temp dir, renamed into place when complete):

    videos/<request_id>.mp4   H.264 (write_video: deterministic), num_frames at fps, height x width
    samples.parquet           one row per video, SAMPLE_COLUMNS (frames_sha256: hash of the generated
                              uint8 frames before mp4 encoding: identical rollouts have equal hashes)
    generation.json           resolved settings, model, adapters, negative prompt, processes
    contact_sheet.png         the first CONTACT_SHEET_MAX_VIDEOS videos, one row each

Several GPUs (`torchrun`, flywheel.train.distributed): every rank calls `generate_videos` with the same
requests and generates requests[rank::world_size] into rank 0's temp dir; rank 0 gathers the rows, writes
the tables and the contact sheet and renames the directory into place; every rank returns the same result.
A video depends only on its (first frame, prompt, seed, adapter, settings): each request seeds its own
generator, so the videos (frames_sha256) do not depend on the number of GPUs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from flywheel.data.video import write_video
from flywheel.generate.config import GenerateConfig
from flywheel.train.distributed import World, current_world

SAMPLE_COLUMNS = (
    "request_id", "video", "adapter", "adapter_path", "seed", "prompt", "prompt_variant", "negative_prompt",
    "source_episode_id", "source_clip_id", "num_frames", "fps", "height", "width", "steps", "guidance_scale",
    "conditional_frame_timestep", "model_id", "revision", "safety", "seconds", "frames_sha256",
)
BASE = "base"  # the `adapter` value of rows made by the bare base model
CONTACT_SHEET_MAX_VIDEOS = 24
CONTACT_SHEET_FRAMES = 6
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[dict], None] | None


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One video to generate. `adapter=None` means the base model."""

    request_id: str  # file name of the video: letters, digits, '.', '_', '-'
    first_frame: np.ndarray | str | os.PathLike  # uint8 [H, W, 3], or a path to an image (PNG)
    prompt: str
    seed: int
    adapter: str | None = None
    source_episode_id: str | None = None
    source_clip_id: str | None = None
    prompt_variant: int = 0  # which of GenerateConfig's prompt phrasings made `prompt` (0: the clip's own)


@dataclasses.dataclass
class GenerationResult:
    out_dir: Path
    frame: pd.DataFrame  # SAMPLE_COLUMNS, in request order
    contact_sheet: Path


# --- requests ---------------------------------------------------------------------------------


def safe_request_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.-") or "request"


def requests_from_clips(clip_frame: pd.DataFrame, clip_root: Path, config: GenerateConfig,
                        adapter: str | None) -> list[GenerationRequest]:
    """One request per (clip, prompt variant, seed), clip-major, capped at config.max_videos.

    `clip_frame` is a clip set's table (columns clip_id, episode_id, split, prompt, first_frame with
    first_frame relative to `clip_root`); filter it to the split you want before calling.
    """
    clip_root = Path(clip_root)
    missing = [c for c in ("clip_id", "episode_id", "prompt", "first_frame") if c not in clip_frame.columns]
    if missing:
        raise ValueError(f"clip table under {clip_root} lacks column(s) {missing}; "
                         "pass a clip set's clips.parquet (flywheel.data.clips.load_clip_set)")
    requests: list[GenerationRequest] = []
    for clip in clip_frame.itertuples(index=False):
        first_frame = clip_root / clip.first_frame
        if not first_frame.is_file():
            raise FileNotFoundError(f"clip {clip.clip_id}: first frame {first_frame} not found; "
                                    "the clip set is incomplete, rebuild it")
        for variant in range(config.prompts_per_first_frame):
            for seed in config.seeds:
                requests.append(GenerationRequest(
                    request_id=safe_request_id(f"{clip.clip_id}-{adapter or BASE}-p{variant}-s{seed}"),
                    first_frame=first_frame, prompt=config.prompt_variant(str(clip.prompt), variant), seed=seed,
                    adapter=adapter, source_episode_id=str(clip.episode_id), source_clip_id=str(clip.clip_id),
                    prompt_variant=variant))
    return requests[: config.max_videos] if config.max_videos else requests


def _check_requests(requests: list[GenerationRequest], adapters: dict[str, Path]) -> None:
    if not requests:
        raise ValueError("generate_videos: no requests given; build them with requests_from_clips")
    ids = [r.request_id for r in requests]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise ValueError(f"generate_videos: duplicate request_id(s) {duplicated[:5]}; each names one video file")
    for r in requests:
        if not _SAFE_ID.match(r.request_id):
            raise ValueError(f"request_id {r.request_id!r} is not a safe file name; use letters, digits, '.', '_', "
                             "'-' (flywheel.generate.world.safe_request_id makes one)")
        if r.adapter is not None and r.adapter not in adapters:
            raise ValueError(f"request {r.request_id}: adapter {r.adapter!r} is not among adapters "
                             f"{sorted(adapters)}; pass adapters={{name: path}} or adapter=None for the base")
        if not r.prompt or not r.prompt.strip():
            raise ValueError(f"request {r.request_id}: empty prompt")
    if BASE in adapters:
        raise ValueError(f"adapter name {BASE!r} is reserved for the base model; rename the adapter")
    for name, path in adapters.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"adapter {name!r}: {path} not found; pass a LoRA directory "
                                    "(pytorch_lora_weights.safetensors) or a .safetensors file")


def _load_image(request: GenerationRequest) -> Image.Image:
    frame = request.first_frame
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"request {request.request_id}: first_frame must be uint8 [H, W, 3], "
                             f"got {frame.dtype} {frame.shape}")
        return Image.fromarray(frame)
    path = Path(frame)
    if not path.is_file():
        raise FileNotFoundError(f"request {request.request_id}: first frame {path} not found")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise ValueError(f"request {request.request_id}: first frame {path} is not a readable image ({e})") from e


# --- adapters ---------------------------------------------------------------------------------


def _lora_kwargs(path: Path) -> tuple[str, dict]:
    """`load_lora_weights` arguments for an adapter directory or a single .safetensors file."""
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}
    return str(path), {}


def load_adapters(pipe, adapters: dict[str, Path]) -> None:
    """Load each adapter into the pipeline once; one already loaded from the same path is kept."""
    loaded: dict[str, str] = getattr(pipe, "flywheel_adapters", {})
    for name, path in adapters.items():
        path = Path(path).resolve()
        if loaded.get(name) == str(path):
            continue
        if name in loaded:  # same name, other weights: replace just that adapter
            pipe.delete_adapters(name)
            del loaded[name]
        where, kwargs = _lora_kwargs(path)
        pipe.load_lora_weights(where, adapter_name=name, **kwargs)
        loaded[name] = str(path)
    pipe.flywheel_adapters = loaded


def use_adapter(pipe, name: str | None) -> None:
    """Make `name` the only active adapter, or run the bare base (None); no weights are loaded."""
    if name is None:
        if getattr(pipe.transformer, "peft_config", None):
            pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name])


def unload_adapters(pipe) -> None:
    """Remove every LoRA layer: the transformer is the bare base model again (same weight tensors)."""
    pipe.unload_lora_weights()
    pipe.flywheel_adapters = {}


# --- generation -------------------------------------------------------------------------------


def _negative_prompt(config: GenerateConfig) -> str:
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

    return config.negative_prompt if config.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT


class PromptEmbeddings:
    """Each prompt encoded once (the text encoder carries no adapter, so embeddings serve every adapter).

    Kept on the pipeline's device for the whole call: with the 2B model one prompt is 512 x 100352
    bf16, about 100 MB, so a call over many distinct prompts holds that much per prompt.
    """

    def __init__(self, pipe, max_sequence_length: int, negative_prompt: str, guidance: bool):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.cache: dict[str, torch.Tensor] = {}
        self.negative = self._encode(negative_prompt) if guidance else None

    @torch.no_grad()
    def _encode(self, prompt: str) -> torch.Tensor:
        embeds, _ = self.pipe.encode_prompt(prompt=prompt, do_classifier_free_guidance=False, num_videos_per_prompt=1,
                                            device=self.pipe._execution_device,
                                            max_sequence_length=self.max_sequence_length)
        return embeds

    def __call__(self, prompt: str) -> torch.Tensor:
        if prompt not in self.cache:
            # Passing embeddings skips the pipeline's own prompt check, so run the guardrail here.
            if not self.pipe.safety_checker.check_text_safety(prompt):
                raise ValueError(f"the safety checker rejected the prompt {prompt!r}; change the prompt")
            self.cache[prompt] = self._encode(prompt)
        return self.cache[prompt]


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[T, C, H, W] in [0, 1] (the pipeline's "pt" output, still on its device) -> uint8 [T, H, W, 3] on the CPU.

    The same values as the stock "np" output's `(clip(x, 0, 1) * 255).round()`, but computed where the
    frames are: at 93x432x768 the float32 copy to the CPU and the numpy passes cost about 4 s per video.
    """
    frames = (video.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def generate_one(pipe, image: Image.Image, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                 seed: int, settings: GenerateConfig, callback=None, latent: bool = False) -> np.ndarray | torch.Tensor:
    """One image-to-world rollout, uint8 [T, H, W, 3]: the stock pipeline call, or our sampler (settings.sampler).
    `latent` (our sampler only): the final latents instead, for `decode_latents` to decode with other videos'."""
    if settings.sampler == "fast":
        from flywheel.generate.sampler import sample_image_to_world

        output = sample_image_to_world(
            pipe, image, prompt_embeds, negative_prompt_embeds, num_frames=settings.num_frames,
            height=settings.height, width=settings.width, num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale, generator=torch.Generator().manual_seed(seed),
            conditional_frame_timestep=settings.conditional_frame_timestep, callback_on_step_end=callback,
            compile=settings.compile, fp8=settings.fp8, step_cache_threshold=settings.step_cache_threshold,
            output_type="latent" if latent else "pt")
        return output.frames if latent else _to_uint8(output.frames[0])
    output = pipe(
        image=image,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        num_frames=settings.num_frames,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        max_sequence_length=pipe.flywheel_preset.max_sequence_length,
        conditional_frame_timestep=settings.conditional_frame_timestep,
        callback_on_step_end=callback,
    )
    return _to_uint8(output.frames[0])


def decode_batch_size(settings: GenerateConfig) -> int:
    """How many videos `generate_videos` decodes together (1: each right after its sampling loop). By default
    (decode_batch None, our sampler only) the codec round trips' budget: as many as CODEC_BATCH_PIXELS allow, at
    most CODEC_MAX_BATCH; a toy model's 17x64x64 videos go 16 at a time, a 93x432x768 one alone, as before."""
    from flywheel.model.encode import codec_batch_size

    if settings.sampler != "fast":
        return 1
    if settings.decode_batch is not None:
        return settings.decode_batch
    return codec_batch_size(settings.num_frames, settings.height, settings.width)


def _maybe_fused(pipe, adapter: str | None, settings: GenerateConfig):
    """The adapter folded into the base weights while its group runs (settings.fuse_lora), else nothing."""
    if not settings.fuse_lora or adapter is None:
        return contextlib.nullcontext()
    from flywheel.generate.sampler import fused_lora

    return fused_lora(pipe, adapter)


def _adapter_groups(requests: list[GenerationRequest], indices: list[int]) -> list[tuple[str | None, list[int]]]:
    """`indices` of `requests` grouped by adapter (in order of first appearance): each adapter is switched to once."""
    groups: dict[str | None, list[int]] = {}
    for i in indices:
        groups.setdefault(requests[i].adapter, []).append(i)
    return list(groups.items())


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; "
                              "generation outputs are immutable, choose a new directory")


def _prepare_out_dir(out_dir: Path) -> Path:
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "videos").mkdir(parents=True)
    return tmp


def _shared_out_dir(out_dir: Path | None, world: World) -> tuple[Path, Path]:
    """(out_dir, temp dir) of rank 0, on every rank: the temp dir all ranks write their videos into."""
    if world.is_main:
        if out_dir is None:
            raise ValueError("generate_videos: out_dir is required (on rank 0)")
        out_dir = Path(out_dir)
        try:
            shared = (out_dir, _prepare_out_dir(out_dir))
        except Exception as e:
            world.broadcast_object(e)  # the other ranks raise it too instead of waiting for a directory
            raise
    else:
        shared = None
    shared = world.broadcast_object(shared)
    if isinstance(shared, Exception):
        raise shared
    return shared


def _my_requests(count: int, world: World) -> list[int]:
    """This rank's request indices: every world_size-th, from its rank (a balanced share of every adapter)."""
    return list(range(world.rank, count, world.world_size))


def _preview(request: GenerationRequest, video: np.ndarray) -> tuple[str, np.ndarray]:
    keep = np.linspace(0, len(video) - 1, CONTACT_SHEET_FRAMES).round().astype(int)
    return f"{request.request_id} [{request.adapter or BASE}]", video[keep].copy()


def _gather_previews(tmp: Path, previews: dict[int, tuple[str, np.ndarray]], world: World
                     ) -> list[tuple[str, np.ndarray]]:
    """The contact-sheet frames of every rank, in request order, on rank 0 (through files in the temp dir:
    up to 24 x 6 full-size frames would be a large object to send through the process group)."""
    share = tmp / ".previews"
    if world.is_distributed and not world.is_main:
        share.mkdir(exist_ok=True)
        for i, (label, frames) in previews.items():
            np.save(share / f"{i:06d}.npy", frames)
            (share / f"{i:06d}.txt").write_text(label)
    world.barrier()
    if not world.is_main:
        return []
    merged = dict(previews)
    if share.is_dir():
        for path in share.glob("*.npy"):
            merged[int(path.stem)] = (path.with_suffix(".txt").read_text(), np.load(path))
        shutil.rmtree(share)
    return [merged[i] for i in sorted(merged)]


def _reporter(progress: Progress, total: int, world: World):
    """(report(event), close()): the progress callback when given, else a tqdm bar over videos; rank 0 only."""
    if not world.is_main:
        return (lambda event: None), (lambda: None)
    if progress is not None:
        return progress, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="generate", unit="video")

    def report(event: dict) -> None:
        if event.get("event") == "video":
            bar.update(1)

    return report, bar.close


def _step_callback(report, done: int, total: int, request_id: str, steps: int):
    def on_step_end(pipe, step, timestep, callback_kwargs):
        report({"event": "step", "done": done, "total": total, "request_id": request_id,
                "step": step + 1, "steps": steps})
        return {}

    return on_step_end


def frames_sha256(video: np.ndarray) -> str:
    """Identity of the generated frames themselves (the mp4 is lossy; this says whether two rollouts match)."""
    video = np.ascontiguousarray(video, dtype=np.uint8)
    return hashlib.sha256(repr(video.shape).encode() + video.tobytes()).hexdigest()


def _sample_row(request: GenerationRequest, adapters: dict[str, Path], settings: GenerateConfig,
                negative_prompt: str | None, pipe, seconds: float, video: np.ndarray) -> dict:
    preset = pipe.flywheel_preset
    return dict(
        request_id=request.request_id, video=f"videos/{request.request_id}.mp4", adapter=request.adapter or BASE,
        adapter_path=str(Path(adapters[request.adapter]).resolve()) if request.adapter else None,
        seed=int(request.seed), prompt=request.prompt, prompt_variant=int(request.prompt_variant),
        negative_prompt=negative_prompt,
        source_episode_id=None if request.source_episode_id is None else str(request.source_episode_id),
        source_clip_id=None if request.source_clip_id is None else str(request.source_clip_id),
        num_frames=settings.num_frames, fps=settings.fps, height=settings.height, width=settings.width,
        steps=settings.num_inference_steps, guidance_scale=float(settings.guidance_scale),
        conditional_frame_timestep=float(settings.conditional_frame_timestep),
        model_id=preset.model_id, revision=preset.revision,
        safety=json.dumps(getattr(pipe, "flywheel_safety", {}), sort_keys=True), seconds=round(seconds, 3),
        frames_sha256=frames_sha256(video),
    )


class BackgroundWriter:
    """Runs each finished video's CPU work (mp4 encode, frame hash, preview) on one worker thread, so it
    overlaps the next rollout on the GPU instead of adding to it.

    At 93x432x768 that work is 3-8 s of one core per video; PyAV's encoder releases the GIL, so the
    sampling loop keeps launching kernels meanwhile. At most `max_pending` videos wait (host memory is
    bounded); an error in the worker surfaces at the next `submit` or at `drain`.
    """

    def __init__(self, max_pending: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-video-writer")
        self._pending: collections.deque[Future] = collections.deque()
        self._max_pending = max_pending

    def submit(self, fn: Callable[..., None], *args) -> None:
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every submitted video (re-raising the first error)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _write_contact_sheet(path: Path, previews: list[tuple[str, np.ndarray]]) -> Path:
    from flywheel.preview import contact_sheet

    return contact_sheet([v for _, v in previews], [label for label, _ in previews], path,
                         frames_per_video=CONTACT_SHEET_FRAMES)


def generate_videos(pipe, requests: list[GenerationRequest], out_dir: Path | None, config: GenerateConfig, *,
                    adapters: dict[str, Path] | None = None, progress: Progress = None) -> GenerationResult:
    """Generate every request's video into `out_dir` (new or empty), with samples.parquet and a contact sheet.

    Adapters stay loaded in `pipe` afterwards (a later call reuses them); `unload_adapters(pipe)`
    restores the bare base. Under torchrun every rank passes the same requests and takes its share;
    rank 0's `out_dir` is the output (the other ranks may pass None) and every rank returns its result.
    Progress is reported by rank 0, for its own share (`done`/`total`), with `processes` = world size.
    """
    world = current_world()
    if out_dir is not None:
        _check_out_dir(Path(out_dir))
    adapters = {name: Path(path) for name, path in (adapters or {}).items()}
    preset = getattr(pipe, "flywheel_preset", None)
    if preset is None:
        raise ValueError("generate_videos: the pipeline has no flywheel_preset; build it with "
                         "flywheel.model.presets.load_pipeline")
    # What runs (the fast path on a GPU), re-validated with the filled values.
    settings = GenerateConfig.model_validate(config.resolved(preset, pipe.transformer.device).model_dump())
    _check_requests(requests, adapters)
    used = {r.adapter for r in requests if r.adapter is not None}
    load_adapters(pipe, {name: path for name, path in adapters.items() if name in used})

    guidance = settings.guidance_scale > 1.0
    negative_prompt = _negative_prompt(settings) if guidance else None
    out_dir, tmp = _shared_out_dir(out_dir, world)
    mine = _my_requests(len(requests), world)
    report, close = _reporter(progress, len(mine), world)
    rows: dict[int, dict] = {}
    previews: dict[int, tuple[str, np.ndarray]] = {}

    def finish(i: int, request: GenerationRequest, video: np.ndarray, seconds: float) -> None:
        write_video(tmp / "videos" / f"{request.request_id}.mp4", video, fps=settings.fps)
        rows[i] = _sample_row(request, adapters, settings, negative_prompt, pipe, seconds, video)
        if i < CONTACT_SHEET_MAX_VIDEOS:
            previews[i] = _preview(request, video)

    writer = BackgroundWriter()
    try:
        embeddings = PromptEmbeddings(pipe, preset.max_sequence_length, negative_prompt or "", guidance)
        done, decode_batch = 0, decode_batch_size(settings)
        pending: list[tuple[int, GenerationRequest, torch.Tensor, float]] = []  # sampled, not yet decoded

        def finished(i: int, request: GenerationRequest, video: np.ndarray, seconds: float) -> None:
            nonlocal done
            writer.submit(finish, i, request, video, seconds)
            done += 1
            report({"event": "video", "done": done, "total": len(mine), "request_id": request.request_id,
                    "adapter": request.adapter or BASE, "seconds": round(seconds, 3),
                    **({"processes": world.world_size} if world.is_distributed else {})})

        def decode_pending() -> None:
            if not pending:
                return
            from flywheel.generate.sampler import decode_latents

            started = time.perf_counter()
            frames = decode_latents(pipe, [latents for _, _, latents, _ in pending], settings.num_frames)
            share = (time.perf_counter() - started) / len(pending)  # each video's seconds include its decode share
            for (i, request, _, seconds), video in zip(pending, frames):
                finished(i, request, _to_uint8(video), seconds + share)
            pending.clear()

        for adapter, indices in _adapter_groups(requests, mine):
            use_adapter(pipe, adapter)
            with _maybe_fused(pipe, adapter, settings):
                for i in indices:
                    request = requests[i]
                    callback = (_step_callback(report, done + len(pending), len(mine), request.request_id,
                                               settings.num_inference_steps) if progress is not None else None)
                    started = time.perf_counter()
                    output = generate_one(pipe, _load_image(request), embeddings(request.prompt), embeddings.negative,
                                          request.seed, settings, callback, latent=decode_batch > 1)
                    seconds = time.perf_counter() - started
                    if decode_batch == 1:
                        finished(i, request, output, seconds)
                        continue
                    pending.append((i, request, output, seconds))
                    if len(pending) == decode_batch:
                        decode_pending()
        decode_pending()
        writer.drain()
        for share in world.all_gather_object(rows):
            rows.update(share)
        frame = pd.DataFrame([rows[i] for i in range(len(requests))], columns=list(SAMPLE_COLUMNS))
        sheet = _gather_previews(tmp, previews, world)
        if world.is_main:
            frame.to_parquet(tmp / "samples.parquet", index=False)
            (tmp / "generation.json").write_text(json.dumps(dict(
                settings=settings.model_dump(mode="json"), negative_prompt=negative_prompt,
                model=preset.as_dict(), safety=getattr(pipe, "flywheel_safety", {}),
                adapters={name: str(Path(p).resolve()) for name, p in adapters.items() if name in used},
                videos=len(frame), unique_prompts=len({r.prompt for r in requests}), processes=world.world_size,
            ), indent=2, sort_keys=True))
            _write_contact_sheet(tmp / "contact_sheet.png", sheet)
            os.rename(tmp, out_dir)  # replaces out_dir when it is an empty directory
        world.barrier()  # the other ranks return once the directory is in place
    except BaseException:
        writer.close()  # no encode may still write into the temp dir being removed
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        writer.close()
        close()
    return GenerationResult(out_dir=out_dir, frame=frame, contact_sheet=out_dir / "contact_sheet.png")
