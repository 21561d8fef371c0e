"""The latent cache with the real tiny Cosmos 2.5 pipeline on real G1 clips: shapes, exact values, caching."""

import dataclasses

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flywheel.data.clips import ClipConfig, prepare_clips
from flywheel.data.latent_cache import LatentCache
from flywheel.data.video import read_frames
from flywheel.model.encode import encode_clip_set, latent_cache_key
from flywheel.model.presets import get_preset
from flywheel.store import ArtifactStore
from flywheel_tests.data.test_clips import g1_manifest

PLACE_TASK = "Put the yellow bottle back."
# Episode 0: 2 train clips (task from the dataset); episode 8: 1 val clip with another task -> 2 prompts.
EPISODES = {0: (2.5, "train"), 8: (1.5, "val")}


@pytest.fixture(scope="module")
def encoded(robot_datasets, tmp_path_factory, tiny_pipe):
    torch.set_num_threads(1)
    manifest = g1_manifest(robot_datasets / "g1_pick_bottle", EPISODES, tasks={8: PLACE_TASK})
    store = ArtifactStore(tmp_path_factory.mktemp("encode") / "home")
    clip_set = prepare_clips(manifest, "manifest-key", store, ClipConfig(), get_preset("tiny"))
    return store, clip_set, encode_clip_set(clip_set, tiny_pipe, store)


def direct_latent(pipe, video_path) -> torch.Tensor:
    """What the recipe's training loop computes for one clip, written out by hand."""
    frames = [Image.fromarray(f) for f in read_frames(video_path)]
    video = pipe.video_processor.preprocess_video(frames, 64, 64)
    with torch.no_grad():
        mu = pipe.vae.encode(video).latent_dist.mean
    return ((mu - pipe.latents_mean) * pipe.latents_std)[0]


def test_latents_have_the_shape_the_transformer_expects(encoded, tiny_pipe):
    _, clip_set, result = encoded
    cache = LatentCache(result.path)
    channels = tiny_pipe.transformer.config.out_channels
    frames = (17 - 1) // tiny_pipe.vae_scale_factor_temporal + 1
    side = 64 // tiny_pipe.vae_scale_factor_spatial
    assert (channels, frames, side) == (16, 5, 8)
    for clip_id in cache.clip_ids(split=None):
        latent = cache.load(clip_id).latent
        assert latent.shape == (16, 5, 8, 8) and latent.dtype == torch.float32
    assert result.summary["latent_shape"] == [16, 5, 8, 8]


def test_latents_equal_the_normalised_vae_mean(encoded, tiny_pipe):
    _, clip_set, result = encoded
    cache = LatentCache(result.path)
    latents = []
    for _, clip in clip_set.frame.iterrows():
        latent = cache.load(clip["clip_id"]).latent
        torch.testing.assert_close(latent, direct_latent(tiny_pipe, clip_set.path / clip["video"]),
                                   rtol=1e-5, atol=1e-5)
        latents.append(latent)
    # Normalisation is applied (not the raw VAE mean) and different clips give different latents.
    with torch.no_grad():
        raw = tiny_pipe.vae.encode(tiny_pipe.video_processor.preprocess_video(
            [Image.fromarray(f) for f in read_frames(clip_set.path / clip_set.frame.iloc[0]["video"])], 64, 64,
        )).latent_dist.mean[0]
    assert not torch.allclose(latents[0], raw, atol=1e-3)
    assert not torch.allclose(latents[0], latents[1], atol=1e-3)


def test_one_embedding_per_unique_prompt_equal_to_the_pipeline_s(encoded, tiny_pipe):
    _, clip_set, result = encoded
    cache = LatentCache(result.path)
    prompts = sorted(set(clip_set.frame["prompt"]))
    assert len(prompts) == 2 and len(list((result.path / "text").iterdir())) == 2
    assert cache.index["embed_file"].nunique() == 2 and result.summary["num_prompts"] == 2
    embeds = {}
    for prompt in prompts:
        clip_id = clip_set.frame.loc[clip_set.frame["prompt"] == prompt, "clip_id"].iloc[0]
        sample = cache.load(clip_id)
        with torch.no_grad():
            expected = tiny_pipe._get_prompt_embeds(prompt, max_sequence_length=64)[0]
        assert sample.prompt == prompt and sample.prompt_embeds.shape == (64, 64)
        torch.testing.assert_close(sample.prompt_embeds, expected)
        embeds[prompt] = sample.prompt_embeds
    assert not torch.equal(*embeds.values())


def test_the_cache_reads_back_by_split(encoded):
    _, clip_set, result = encoded
    cache = LatentCache(result.path)
    assert len(cache) == 3
    assert cache.clip_ids("train") == clip_set.split("train")["clip_id"].tolist()
    assert cache.clip_ids("val") == ["g1_pick_bottle-000008-f00000"]
    assert cache.meta["clip_set"] == clip_set.key and cache.meta["num_clips"] == 3
    assert result.summary["clips_per_minute"] > 0 and result.summary["video_seconds"] > 0


def test_encoding_again_reuses_the_cache_without_running_the_models(encoded, tiny_pipe, monkeypatch):
    store, clip_set, result = encoded

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache exists; nothing should be encoded again")

    monkeypatch.setattr(tiny_pipe.vae, "encode", must_not_run)
    monkeypatch.setattr(tiny_pipe, "_get_prompt_embeds", must_not_run)
    again = encode_clip_set(clip_set, tiny_pipe, store)
    assert again.reused and again.path == result.path and again.key == result.key
    assert again.summary["num_clips"] == 3


def test_cache_key_names_the_model(encoded, tiny_pipe, monkeypatch):
    _, clip_set, result = encoded
    assert latent_cache_key(clip_set, tiny_pipe) == result.key
    monkeypatch.setattr(tiny_pipe, "flywheel_preset", dataclasses.replace(tiny_pipe.flywheel_preset, revision="seed-1"))
    assert latent_cache_key(clip_set, tiny_pipe) != result.key


def test_batched_encoding_gives_the_same_latents(encoded, tiny_pipe, tmp_path):
    _, clip_set, result = encoded
    batched = encode_clip_set(clip_set, tiny_pipe, ArtifactStore(tmp_path / "home"), batch_size=2)
    assert batched.key == result.key and batched.summary["batch_size"] == 2
    for clip_id in clip_set.frame["clip_id"]:
        torch.testing.assert_close(load_file(batched.path / f"latents/{clip_id}.safetensors")["latent"],
                                   load_file(result.path / f"latents/{clip_id}.safetensors")["latent"],
                                   rtol=1e-5, atol=1e-5)


def test_codec_roundtrip_renders_frames_as_the_vae_does(tiny_pipe):
    """What the quality filters calibrate on with calibrate_on=model_codec: real frames through the VAE."""
    import numpy as np

    from flywheel.model.encode import codec_roundtrip

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (7, 48, 40, 3), dtype=np.uint8)  # not 1 + 4k frames, not the preset's size
    out = codec_roundtrip(tiny_pipe, frames)
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert not np.array_equal(out, frames)  # the random-weight tiny VAE cannot reproduce noise
    # the same frames through the pipeline's own preprocess/encode/decode give the same pixels
    again = codec_roundtrip(tiny_pipe, frames)
    assert np.array_equal(out, again)


def test_codec_roundtrips_batch_clips_of_one_shape_and_match_one_by_one(tiny_pipe):
    import numpy as np

    from flywheel.model.encode import codec_roundtrip, codec_roundtrips

    rng = np.random.default_rng(1)
    clips = [rng.integers(0, 256, shape, dtype=np.uint8)
             for shape in [(7, 48, 40, 3), (5, 64, 64, 3), (7, 48, 40, 3), (7, 48, 40, 3)]]
    batched = codec_roundtrips(tiny_pipe, clips, batch_size=2)  # the three 7-frame clips: a batch of 2, then 1
    assert [b.shape for b in batched] == [c.shape for c in clips]
    for clip, out in zip(clips, batched):
        alone = codec_roundtrip(tiny_pipe, clip)
        assert np.abs(out.astype(int) - alone.astype(int)).max() <= 1, "batching only changes float rounding"
        assert np.mean(out != alone) < 1e-3
