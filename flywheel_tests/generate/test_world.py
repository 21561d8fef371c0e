"""Image-to-world generation on the tiny Cosmos Predict 2.5 pipeline with two real peft LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flywheel.data.video import probe, read_frames
from flywheel.generate.config import GenerateConfig
from flywheel.generate.sampler import decode_latents
from flywheel.generate.world import (
    BASE,
    SAMPLE_COLUMNS,
    BackgroundWriter,
    GenerationRequest,
    PromptEmbeddings,
    decode_batch_size,
    frames_sha256,
    generate_one,
    generate_videos,
    requests_from_clips,
    unload_adapters,
)

PROMPT = "Pick up the yellow bottle on the table."
STEPS = 2
# decode_batch=1: these tests compare frames bit for bit (hashes), so each video is decoded alone; the default
# batched decode is tested against it below.
CONFIG = GenerateConfig(seeds=[0, 1], num_inference_steps=STEPS, decode_batch=1)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
REAL_VIDEO = "g1_pick_bottle/videos/observation.images.cam_high/chunk-000/file-000.mp4"


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    """The shared tiny pipeline, bare before and after this module."""
    torch.set_num_threads(1)
    unload_adapters(tiny_pipe)
    yield tiny_pipe
    unload_adapters(tiny_pipe)


@pytest.fixture(scope="module")
def first_frame(robot_datasets) -> np.ndarray:
    """A real robot camera frame (480x640); the pipeline resizes it to the preset's 64x64."""
    return read_frames(robot_datasets / REAL_VIDEO, 0.0, 0.05)[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two different LoRA adapters saved the diffusers way, made on a separate copy of the tiny transformer."""
    from diffusers import Cosmos2_5_PredictBasePipeline, CosmosTransformer3DModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from flywheel.model.presets import TINY_TRANSFORMER

    root = tmp_path_factory.mktemp("adapters")
    transformer = CosmosTransformer3DModel(**TINY_TRANSFORMER)
    paths = {}
    for seed, name in enumerate(["a", "b"]):
        torch.manual_seed(100 + seed)
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False))
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(transformer))
        Cosmos2_5_PredictBasePipeline.save_lora_weights(root / name, transformer_lora_layers=layers)
        transformer.delete_adapters("default")
        paths[name] = root / name
    return paths


def request(request_id, frame, seed, adapter=None, prompt=PROMPT):
    return GenerationRequest(request_id=request_id, first_frame=frame, prompt=prompt, seed=seed, adapter=adapter,
                             source_episode_id="ep0", source_clip_id="ep0-f00000")


def frames_of(result, request_id) -> np.ndarray:
    row = result.frame.set_index("request_id").loc[request_id]
    return read_frames(result.out_dir / row["video"])


def sha(result, request_id) -> str:
    """The generated frames' identity (exact; the mp4 encoding is lossy)."""
    return result.frame.set_index("request_id").loc[request_id, "frames_sha256"]


def base_weights(pipe) -> dict[str, tuple[int, torch.Tensor]]:
    return {name: (id(p), p.detach().clone()) for name, p in pipe.transformer.named_parameters()}


def test_adapters_switch_on_one_frozen_base(pipe, adapters, first_frame, tmp_path):
    transformer = pipe.transformer
    before = base_weights(pipe)
    fresh_base = generate_videos(pipe, [request("base-s0", first_frame, 0)], tmp_path / "fresh", CONFIG)

    # Interleaved order: the run groups by adapter but keeps ids and output order as given.
    mixed = [request("a-s0", first_frame, 0, "a"), request("base-s0", first_frame, 0),
             request("b-s0", first_frame, 0, "b"), request("base-s1", first_frame, 1),
             request("base-s0-again", first_frame, 0)]
    result = generate_videos(pipe, mixed, tmp_path / "mixed", CONFIG, adapters=adapters)
    assert result.frame["request_id"].tolist() == [r.request_id for r in mixed]
    assert result.frame["adapter"].tolist() == ["a", BASE, "b", BASE, BASE]

    for row in result.frame.itertuples():
        info = probe(result.out_dir / row.video)
        assert (info["num_frames"], info["height"], info["width"]) == (17, 64, 64)
        assert info["fps"] == 16
    assert frames_of(result, "a-s0").shape == (17, 64, 64, 3)
    a0, b0, base0, base1 = (sha(result, i) for i in ("a-s0", "b-s0", "base-s0", "base-s1"))
    assert sha(result, "base-s0-again") == base0, "same seed must give identical frames"
    assert base1 != base0, "different seeds must give different videos"
    assert sha(fresh_base, "base-s0") == base0, "base with adapters loaded-but-off != fresh base"
    assert len({a0, b0, base0}) == 3, "adapter A, adapter B and the base must differ"
    # The mp4s hold those frames: equal rollouts decode alike, different ones visibly differ.
    decoded = {i: frames_of(result, i).astype(int) for i in ("a-s0", "base-s0", "base-s0-again")}
    assert np.abs(decoded["base-s0"] - decoded["base-s0-again"]).mean() < 1
    assert np.abs(decoded["base-s0"] - decoded["a-s0"]).mean() > 2

    # Adapters stay loaded: later calls switch A -> base -> A without loading anything.
    loaded_ids = {id(p) for p in transformer.parameters()}
    assert all(pid in loaded_ids for pid, _ in before.values()), "base weights were replaced, not wrapped"
    again_base = generate_videos(pipe, [request("base-s0", first_frame, 0)], tmp_path / "again-base", CONFIG,
                                 adapters=adapters)
    again_a = generate_videos(pipe, [request("a-s0", first_frame, 0, "a")], tmp_path / "again-a", CONFIG,
                              adapters=adapters)
    assert sha(again_base, "base-s0") == base0
    assert sha(again_a, "a-s0") == a0, "switching back to A must reproduce A exactly"
    # The same name with other weights (a single .safetensors file) replaces just that adapter.
    renamed = generate_videos(pipe, [request("a-s0", first_frame, 0, "a")], tmp_path / "renamed", CONFIG,
                              adapters={"a": adapters["b"] / "pytorch_lora_weights.safetensors"})
    assert sha(renamed, "a-s0") == b0

    unload_adapters(pipe)
    after_unload = generate_videos(pipe, [request("base-s0", first_frame, 0)], tmp_path / "unloaded", CONFIG)
    assert sha(after_unload, "base-s0") == base0, "unloading must restore the untouched base"
    assert pipe.transformer is transformer
    after = dict(pipe.transformer.named_parameters())
    assert after.keys() == before.keys(), "LoRA layers left behind after unload_adapters"
    for name, (pid, value) in before.items():
        assert id(after[name]) == pid, f"{name} was reloaded"
        assert torch.equal(after[name], value), f"{name} changed"



def test_samples_table_and_artifacts_complete(pipe, adapters, first_frame, tmp_path):
    config = GenerateConfig(seeds=[0], num_inference_steps=STEPS, fps=8)
    reqs = [request("b-s3", first_frame, 3, "b"), request("base-s3", first_frame, 3)]
    result = generate_videos(pipe, reqs, tmp_path / "out", config, adapters=adapters)
    unload_adapters(pipe)

    table = pd.read_parquet(tmp_path / "out" / "samples.parquet")
    assert tuple(table.columns) == SAMPLE_COLUMNS
    pd.testing.assert_frame_equal(table, result.frame)
    nullable = {"adapter_path"}
    b, base = table.iloc[0], table.iloc[1]
    assert not b[[c for c in SAMPLE_COLUMNS if c not in nullable]].isna().any()
    assert b["adapter_path"] == str(adapters["b"].resolve()) and base["adapter_path"] is None
    assert (b["adapter"], base["adapter"]) == ("b", "base")
    assert (b["seed"], b["num_frames"], b["fps"], b["height"], b["width"], b["steps"]) == (3, 17, 8, 64, 64, STEPS)
    assert b["guidance_scale"] == 7.0 and b["model_id"] == pipe.flywheel_preset.model_id
    assert b["revision"] == pipe.flywheel_preset.revision
    assert (b["source_episode_id"], b["source_clip_id"], b["prompt"]) == ("ep0", "ep0-f00000", PROMPT)
    assert json.loads(b["safety"]) == pipe.flywheel_safety
    assert b["seconds"] > 0 and b["negative_prompt"] and len(b["frames_sha256"]) == 64
    assert probe(tmp_path / "out" / b["video"])["fps"] == 8

    generation = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert generation["settings"]["num_inference_steps"] == STEPS and generation["unique_prompts"] == 1
    assert set(generation["adapters"]) == {"b"}
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.format == "PNG" and sheet.width > 6 * 64 and sheet.height > 2 * 64
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["out"], "temp dir left behind"


def test_prompt_embeddings_reused_and_equal_to_plain_call(pipe, first_frame, tmp_path):
    settings = CONFIG.resolved(pipe.flywheel_preset)
    image = Image.fromarray(first_frame)
    plain = pipe(image=image, prompt=PROMPT, num_frames=17, height=64, width=64, num_inference_steps=STEPS,
                 guidance_scale=7.0, generator=torch.Generator().manual_seed(0), output_type="np",
                 max_sequence_length=pipe.flywheel_preset.max_sequence_length).frames[0]
    plain = (np.clip(plain, 0, 1) * 255).round().astype(np.uint8)
    embeddings = PromptEmbeddings(pipe, pipe.flywheel_preset.max_sequence_length, _default_negative(), guidance=True)
    reused = generate_one(pipe, image, embeddings(PROMPT), embeddings.negative, 0, settings)
    assert np.array_equal(plain, reused), "precomputed prompt embeddings must give the plain call's frames"

    # Through generate_videos: 2 prompts x 2 seeds -> the text encoder runs 3 times (2 prompts + negative).
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        reqs = [request(f"p{p}-s{s}", first_frame, s, prompt=[PROMPT, "Wave at the camera."][p])
                for p in range(2) for s in range(2)]
        result = generate_videos(pipe, reqs, tmp_path / "out", CONFIG)
    finally:
        hook.remove()
    assert len(calls) == 3
    assert sha(result, "p0-s0") == frames_sha256(plain)
    assert len(set(result.frame["frames_sha256"])) == 4


def test_batched_decode_gives_each_videos_frames_to_float_rounding(pipe, first_frame, tmp_path):
    """The default on a CPU decodes a run's videos in one VAE call; each video's frames stay those of its own
    decode, within one gray level (float summation order), in the order of the requests."""
    settings = CONFIG.model_copy(update={"decode_batch": None}).resolved(pipe.flywheel_preset, "cpu")
    assert settings.sampler == "fast" and decode_batch_size(settings) == 16
    embeddings = PromptEmbeddings(pipe, pipe.flywheel_preset.max_sequence_length, _default_negative(), guidance=True)
    image = Image.fromarray(first_frame)
    latents = [generate_one(pipe, image, embeddings(PROMPT), embeddings.negative, seed, settings, latent=True)
               for seed in range(3)]
    alone = [generate_one(pipe, image, embeddings(PROMPT), embeddings.negative, seed, settings) for seed in range(3)]
    batched = [(f.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
               for f in decode_latents(pipe, latents, settings.num_frames)]
    for one, many in zip(alone, batched):
        assert one.shape == many.shape == (17, 64, 64, 3)
        assert np.abs(one.astype(int) - many.astype(int)).max() <= 1
    assert not np.array_equal(batched[0], batched[1]), "each video keeps its own frames"
    result = generate_videos(pipe, [request(f"s{s}", first_frame, s) for s in range(3)], tmp_path / "out",
                             CONFIG.model_copy(update={"decode_batch": None}))
    assert result.frame["request_id"].tolist() == ["s0", "s1", "s2"]
    assert result.frame["frames_sha256"].tolist() == [frames_sha256(v) for v in batched]


def _default_negative() -> str:
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT


def test_requests_from_clips_and_progress(pipe, first_frame, tmp_path):
    root = tmp_path / "clips"
    (root / "first_frames").mkdir(parents=True)
    rows = []
    for i in range(2):
        Image.fromarray(np.roll(first_frame, 40 * i, axis=1)).save(root / f"first_frames/ep{i}-f00000.png")
        rows.append(dict(clip_id=f"ep{i}-f00000", episode_id=f"ep{i}", split="train", prompt=PROMPT,
                         first_frame=f"first_frames/ep{i}-f00000.png"))
    clips = pd.DataFrame(rows)
    config = GenerateConfig(seeds=[0, 1], prompts_per_first_frame=2, num_inference_steps=STEPS)
    reqs = requests_from_clips(clips, root, config, None)
    assert len(reqs) == 2 * 2 * 2 and len({r.request_id for r in reqs}) == 8
    assert [(r.source_clip_id, r.prompt_variant, r.seed) for r in reqs[:4]] == [
        ("ep0-f00000", 0, 0), ("ep0-f00000", 0, 1), ("ep0-f00000", 1, 0), ("ep0-f00000", 1, 1)]
    assert reqs[0].prompt == PROMPT and reqs[2].prompt.startswith(PROMPT) and reqs[2].prompt != PROMPT
    assert reqs[0].source_episode_id == "ep0" and reqs[0].first_frame == root / "first_frames/ep0-f00000.png"
    capped = requests_from_clips(clips, root, config.model_copy(update={"max_videos": 3}), "a")
    assert len(capped) == 3 and all(r.adapter == "a" and "-a-" in r.request_id for r in capped)

    events = []
    chosen = [reqs[0], reqs[4]]
    result = generate_videos(pipe, chosen, tmp_path / "out", config, progress=events.append)
    videos = [e for e in events if e["event"] == "video"]
    steps = [e for e in events if e["event"] == "step"]
    assert [(e["done"], e["total"]) for e in videos] == [(1, 2), (2, 2)]
    assert len(steps) == 2 * STEPS and steps[-1]["step"] == STEPS
    assert result.frame["source_clip_id"].tolist() == ["ep0-f00000", "ep1-f00000"]
    assert sha(result, reqs[0].request_id) != sha(result, reqs[4].request_id)

    (root / "first_frames/ep1-f00000.png").unlink()
    with pytest.raises(FileNotFoundError, match="ep1-f00000.png"):
        requests_from_clips(clips, root, config, None)
    with pytest.raises(ValueError, match="first_frame"):
        requests_from_clips(clips.drop(columns=["first_frame"]), root, config, None)


def test_failures_leave_nothing_half_written(pipe, first_frame, tmp_path):
    out = tmp_path / "out"
    bad = [request("ok", first_frame, 0), request("missing", tmp_path / "nope.png", 0)]
    with pytest.raises(FileNotFoundError, match="nope.png"):
        generate_videos(pipe, bad, out, CONFIG)
    assert not out.exists() and list(tmp_path.iterdir()) == [], "a failed run left files behind"

    with pytest.raises(ValueError, match="adapter 'c'"):
        generate_videos(pipe, [request("x", first_frame, 0, "c")], out, CONFIG)
    with pytest.raises(ValueError, match="duplicate request_id"):
        generate_videos(pipe, [request("x", first_frame, 0), request("x", first_frame, 1)], out, CONFIG)
    with pytest.raises(ValueError, match="safe file name"):
        generate_videos(pipe, [request("../x", first_frame, 0)], out, CONFIG)
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        generate_videos(pipe, [request("x", first_frame, 0)], out, CONFIG)
    (out / "keep.txt").unlink()
    result = generate_videos(pipe, [request("x", first_frame, 0)], out, CONFIG)  # an empty dir is filled
    assert (out / "videos" / "x.mp4").is_file() and result.out_dir == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_background_writer_bounds_pending_work_and_surfaces_errors():
    import threading

    release, started, finished = threading.Event(), [], []

    def encode(i):
        started.append(i)
        release.wait(5)
        finished.append(i)

    writer = BackgroundWriter(max_pending=2)
    try:
        writer.submit(encode, 0)
        writer.submit(encode, 1)
        blocked = threading.Thread(target=writer.submit, args=(encode, 2))
        blocked.start()
        blocked.join(0.3)
        assert blocked.is_alive(), "a third video must wait while two are pending"
        release.set()
        blocked.join(5)
        writer.drain()
        assert finished == [0, 1, 2]

        def broken(path):
            raise OSError(f"disk full writing {path}")

        writer.submit(broken, "videos/a.mp4")
        with pytest.raises(OSError, match="videos/a.mp4"):
            writer.drain()
    finally:
        writer.close()


@pytest.mark.parametrize("field, value", [
    ("num_inference_steps", 0), ("guidance_scale", 0.5), ("num_frames", 18), ("height", 70), ("width", 8),
    ("seeds", []), ("fps", 0), ("prompts_per_first_frame", 9), ("prompt_variations", ["no placeholder"]),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        GenerateConfig(**{field: value})


def test_config_resolves_preset_defaults():
    from flywheel.model.presets import get_preset

    with pytest.raises(ValidationError, match="extra"):
        GenerateConfig(steps=3)
    tiny = GenerateConfig().resolved(get_preset("tiny"))
    full = GenerateConfig(num_frames=29).resolved(get_preset("cosmos-predict2.5-2b"))
    assert (tiny.num_inference_steps, tiny.num_frames, tiny.height, tiny.width, tiny.fps) == (4, 17, 64, 64, 16)
    assert (full.num_inference_steps, full.num_frames, full.guidance_scale, full.height) == (36, 29, 7.0, 432)
