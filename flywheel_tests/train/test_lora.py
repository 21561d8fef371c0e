"""LoRA / DoRA training on the tiny Cosmos 2.5 pipeline: the loss goes down, adapters round-trip through
the stock diffusers loader (alpha != rank included), the pipeline is left clean, bad configs are refused."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from flywheel.store import hash_file

from flywheel.train import TrainConfig, flow_matching_loss, load_adapter, remove_adapter, sample_flow_draw, train_adapter
from flywheel.train.adapter_io import ADAPTER_WEIGHTS, adapter_scalings, read_saved_adapter, save_adapter
from flywheel.train.lora import add_training_adapter, load_batch
from flywheel.train.schedule import lr_multiplier
from flywheel_tests.train import PROMPT, tiny_latent_cache  # noqa: F401  (session fixture)
from flywheel_tests.adapter_card import make_card

# A constant LR well above the recipe's: 40 steps must move a random tiny model visibly.
FAST = dict(rank=4, alpha=4, steps=40, learning_rate=1e-2, warmup_steps=0, f_start=1.0, f_max=1.0, f_min=1.0,
            checkpoint_every=1000)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _peft_free(transformer) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return not any(isinstance(m, BaseTunerLayer) for m in transformer.modules()) and not getattr(transformer, "peft_config", None)


def _eval_loss(pipe, cache) -> float:
    """Velocity loss on every clip x 4 fixed draws of noise / sigma / conditioning (no text dropout)."""
    latents, embeds = load_batch(cache, cache.clip_ids() * 4, torch.device("cpu"))
    draw = sample_flow_draw(latents.shape, TrainConfig(cfg_dropout=0.0), torch.Generator().manual_seed(123))
    with torch.no_grad():
        return flow_matching_loss(pipe.transformer, latents, embeds, draw, torch.zeros(1, 1, 64, 64)).item()


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_training_lowers_the_loss_and_writes_a_complete_adapter(tiny_pipe, tiny_latent_cache, tmp_path, method):
    cache = tiny_latent_cache
    before = _eval_loss(tiny_pipe, cache)
    seen = []
    result = train_adapter(cache, tiny_pipe, TrainConfig(method=method, **FAST), tmp_path / "run", progress=seen.append)

    assert _peft_free(tiny_pipe.transformer), "training must leave the base pipeline without adapter layers"
    assert _eval_loss(tiny_pipe, cache) == before, "base model changed"
    load_adapter(tiny_pipe, result.adapter_dir, "trained")
    try:
        after = _eval_loss(tiny_pipe, cache)
    finally:
        remove_adapter(tiny_pipe)
    assert after < 0.85 * before, f"{method}: eval loss {before:.4f} -> {after:.4f}, expected a clear decrease"

    assert [p["step"] for p in seen] == list(range(1, 41)) and all(np.isfinite(p["loss"]) for p in seen)
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {ADAPTER_WEIGHTS, "adapter_card.json", "loss.csv", "loss.png"} <= files
    assert not list(tmp_path.glob("run/checkpoint-*")) and not list(tmp_path.glob("run/.*tmp*"))
    card = result.card
    assert card["method"] == method and card["rank"] == 4 and card["alpha"] == 4
    assert card["base_model"]["model_id"] == tiny_pipe.flywheel_preset.model_id == cache.meta["model_id"]
    assert card["base_model"]["revision"] == tiny_pipe.flywheel_preset.revision
    assert card["training_data"]["cache_key"] == cache.root.name and card["training_data"]["num_train_clips"] == 4
    assert card["final_loss"] == pytest.approx(np.mean(result.losses[-10:]))
    # The card records what ran: speed settings left as None are made concrete for the device (a CPU here).
    assert (card["config"]["activation_checkpointing"], card["config"]["compile"]) == ("none", False)
    with open(result.adapter_dir / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in rows] == result.losses and len(rows) == 40
    with Image.open(result.adapter_dir / "loss.png") as png:
        assert png.format == "PNG" and png.size == (720, 400)
        assert len(png.convert("RGB").getcolors(1 << 16)) > 3, "the plot has no curve"
    state_dict, _ = read_saved_adapter(result.adapter_dir)
    assert any(k.endswith("lora_magnitude_vector") for k in state_dict) == (method == "dora")

    # The same work_dir again: the finished adapter is returned, not retrained; another config is refused.
    again = train_adapter(cache, tiny_pipe, TrainConfig(method=method, **FAST), tmp_path / "run", progress=seen.append)
    assert again.losses == result.losses and len(seen) == 40
    with pytest.raises(ValueError, match="another config"):
        train_adapter(cache, tiny_pipe, TrainConfig(method=method, **{**FAST, "seed": 1}), tmp_path / "run")


def _generate(pipe) -> np.ndarray:
    return pipe(prompt=PROMPT, height=64, width=64, num_frames=17, num_inference_steps=2,
                generator=torch.Generator().manual_seed(7), output_type="np").frames[0]


@pytest.mark.parametrize("method,rank,alpha", [("lora", 4, 8), ("dora", 4, 2)])
def test_saved_adapter_loads_with_the_stock_loader_like_the_in_memory_one(tiny_pipe, tmp_path, method, rank, alpha):
    config = TrainConfig(method=method, rank=rank, alpha=alpha)
    base = _generate(tiny_pipe)
    params = add_training_adapter(tiny_pipe.transformer, config)
    try:
        with torch.no_grad():  # a non-trivial adapter: B starts at zero, magnitudes at the weight norms
            g = torch.Generator().manual_seed(0)
            for p in params:
                p.add_(0.2 * torch.randn(p.shape, generator=g) * p.detach().abs().mean().clamp_min(0.1))
        assert adapter_scalings(tiny_pipe.transformer, "default") == {alpha / rank}
        in_memory = _generate(tiny_pipe)
        save_adapter(tiny_pipe.transformer, tmp_path / "adapter", make_card(method, rank, alpha))
    finally:
        remove_adapter(tiny_pipe)
    assert _peft_free(tiny_pipe.transformer)
    assert not np.allclose(in_memory, base, atol=1e-3), "the adapter must change the output for this test to mean anything"

    card = load_adapter(tiny_pipe, tmp_path / "adapter", adapter_name="mine")
    try:
        assert adapter_scalings(tiny_pipe.transformer, "mine") == {alpha / rank}
        assert tiny_pipe.transformer.peft_config["mine"].use_dora == (method == "dora")
        loaded = _generate(tiny_pipe)
    finally:
        remove_adapter(tiny_pipe, "mine")
    assert card.alpha == alpha
    np.testing.assert_allclose(loaded, in_memory, rtol=0, atol=1e-5)
    np.testing.assert_allclose(_generate(tiny_pipe), base, rtol=0, atol=1e-6)


def test_child_adapter_starts_from_its_parent(tiny_pipe, tiny_latent_cache, tmp_path):
    parent = train_adapter(tiny_latent_cache, tiny_pipe, TrainConfig(**{**FAST, "steps": 5}), tmp_path / "parent",
                           progress=lambda _: None)
    # One step at a vanishing LR: the child's weights are the parent's.
    child_config = TrainConfig(**{**FAST, "steps": 1, "learning_rate": 1e-12, "init_adapter": parent.adapter_dir})
    child = train_adapter(tiny_latent_cache, tiny_pipe, child_config, tmp_path / "child", progress=lambda _: None)
    parent_sd, _ = read_saved_adapter(parent.adapter_dir)
    child_sd, _ = read_saved_adapter(child.adapter_dir)
    assert parent_sd.keys() == child_sd.keys()
    assert max((parent_sd[k] - child_sd[k]).abs().max().item() for k in parent_sd) < 1e-6
    assert any(parent_sd[k].abs().max() > 0 for k in parent_sd if "lora.up" in k), "parent must be trained (B != 0)"
    assert child.card["lineage"] == "continued"  # named by the parent's weights, not a path (homes move)
    assert child.card["parent_adapter"]["weights_sha256"] == hash_file(parent.adapter_dir / "pytorch_lora_weights.safetensors")

    with pytest.raises(ValueError, match="init_adapter"):
        train_adapter(tiny_latent_cache, tiny_pipe, TrainConfig(**{**FAST, "rank": 8, "init_adapter": parent.adapter_dir}),
                      tmp_path / "bad-child", progress=lambda _: None)
    assert _peft_free(tiny_pipe.transformer)


def test_lr_schedule_is_linear_warmup_then_linear_decay():
    f = lr_multiplier(TrainConfig(steps=1000, warmup_steps=100))
    assert f(0) == pytest.approx(1e-6) and f(50) == pytest.approx((0.5 + 1e-6) / 2, rel=1e-4)
    assert f(100) == pytest.approx(0.5) and f(550) == pytest.approx(0.35) and f(1000) == pytest.approx(0.2)
    assert f(5000) == pytest.approx(0.2)
    default = TrainConfig(steps=500)
    assert default.resolved_warmup_steps == 50 and TrainConfig(steps=10**6).resolved_warmup_steps == 2000
    assert default.learning_rate == 2**-14.5 and default.weight_decay == 1e-3 and default.rank == default.alpha == 32


@pytest.mark.parametrize("field,value", [
    ("rank", 0),
    ("steps", 0),
    ("cfg_dropout", 1.0),
    ("cfg_dropout", -0.1),
    ("conditional_frames_probs", {1: 0.3, 2: 0.3}),
    ("conditional_frames_probs", {3: 1.0}),
    ("method", "qlora"),
    ("target_modules", []),
    ("learning_rate", 0),
    ("warmup_steps", 1000),
    ("unknown_field", 1),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValidationError) as err:
        TrainConfig(steps=1000 if field != "steps" else value, **({field: value} if field != "steps" else {}))
    assert field in str(err.value), str(err.value)

