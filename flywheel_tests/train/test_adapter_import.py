"""Importing external adapters on the tiny Cosmos 2.5 pipeline: a LoRA/DoRA saved exactly as the diffusers
examples/cosmos recipe saves it (stock `save_lora_weights`, no alpha metadata, alpha != rank) is refused without
an alpha, imported with it, and then generates through flywheel's adapter loading what the in-memory adapter
and the stock loader at weight alpha/rank generate. Files that do not fit the base model are refused by name."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flywheel.errors import DataError
from flywheel.generate.world import load_adapters, unload_adapters, use_adapter
from flywheel.store import hash_file
from flywheel.train.adapter_import import declared_base_model, import_adapter
from flywheel.train.adapter_io import ADAPTER_WEIGHTS, adapter_scalings, load_adapter, read_card, remove_adapter
from flywheel_tests.train import PROMPT

RANK, ALPHA = 4, 8.0  # alpha != rank: loading at alpha = rank (diffusers' guess without metadata) is visibly wrong
RECIPE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]  # the recipe's list


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _generate(pipe) -> np.ndarray:
    return pipe(prompt=PROMPT, height=64, width=64, num_frames=17, num_inference_steps=2,
                generator=torch.Generator().manual_seed(7), output_type="np").frames[0]


def _recipe_lora(pipe, out_dir, use_dora: bool, seed: int = 0):
    """A non-trivial LoRA/DoRA on the tiny transformer, saved the way examples/cosmos/train_cosmos_predict25_lora.py
    saves its result; returns the frames the adapter generates in memory (its true strength alpha/rank)."""
    from diffusers import Cosmos2_5_PredictBasePipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    dit = pipe.transformer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dit.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=RECIPE_TARGETS,
                                   use_dora=use_dora))
    try:
        with torch.no_grad():  # stands in for training: B leaves zero, magnitudes leave the weight norms
            g = torch.Generator().manual_seed(seed)
            for p in (p for p in dit.parameters() if p.requires_grad):
                p.add_(0.2 * torch.randn(p.shape, generator=g) * p.detach().abs().mean().clamp_min(0.1))
        frames = _generate(pipe)
        Cosmos2_5_PredictBasePipeline.save_lora_weights(
            save_directory=out_dir,
            transformer_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(dit)),
            safe_serialization=True,
        )
        peft_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(dit).items()}
    finally:
        remove_adapter(pipe)
    return frames, peft_state


@pytest.fixture(scope="module", params=["lora", "dora"])
def recipe(request, tiny_pipe, tmp_path_factory):
    use_dora = request.param == "dora"
    out = tmp_path_factory.mktemp(f"recipe-{request.param}")
    frames, peft_state = _recipe_lora(tiny_pipe, out, use_dora)
    return {"method": request.param, "file": out / ADAPTER_WEIGHTS, "frames": frames, "peft_state": peft_state,
            "base_frames": _generate(tiny_pipe)}


def _flywheel_frames(pipe, adapter_dir) -> np.ndarray:
    """Frames through the loaders flywheel's generation uses (flywheel.generate.world)."""
    load_adapters(pipe, {"imported": adapter_dir})
    try:
        use_adapter(pipe, "imported")
        return _generate(pipe)
    finally:
        unload_adapters(pipe)


def test_recipe_file_is_refused_without_alpha_and_imported_with_it(tiny_pipe, recipe, tmp_path):
    source = recipe["file"]
    with safe_open(source, framework="pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {}), "the recipe file must carry no alpha for this test"
    base = declared_base_model(tiny_pipe)

    with pytest.raises(DataError) as refused:
        import_adapter(source, tiny_pipe.transformer, tmp_path / "refused", base_model=base)
    assert str(source) in str(refused.value) and "--alpha" in str(refused.value)
    assert not (tmp_path / "refused").exists()

    imported = import_adapter(source, tiny_pipe.transformer, tmp_path / "imported", base_model=base, alpha=ALPHA)
    card = imported.card
    assert card == read_card(imported.adapter_dir).model_dump(mode="json")
    assert (card["lineage"], card["method"], card["rank"], card["alpha"]) == ("external", recipe["method"], RANK, ALPHA)
    assert card["scaling"] == ALPHA / RANK and card["base_model"] == base
    assert card["source"]["sha256"] == hash_file(source) and card["source"]["format"] == "diffusers-lora"
    assert card["source"]["alpha_from"] == "argument"
    assert sorted(p.name for p in imported.adapter_dir.iterdir()) == ["adapter_card.json", ADAPTER_WEIGHTS]

    # Generation: flywheel's loaders give the adapter's true strength, the same as the stock loader told the
    # weight alpha/rank; the stock loader alone (alpha = rank) gives something else.
    flywheel = _flywheel_frames(tiny_pipe, imported.adapter_dir)
    tiny_pipe.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name="stock")
    try:
        tiny_pipe.set_adapters(["stock"], [1.0])
        stock_unscaled = _generate(tiny_pipe)
        tiny_pipe.set_adapters(["stock"], [ALPHA / RANK])
        assert adapter_scalings(tiny_pipe.transformer, "stock") == {ALPHA / RANK}
        stock = _generate(tiny_pipe)
    finally:
        remove_adapter(tiny_pipe)
    assert not np.allclose(recipe["frames"], recipe["base_frames"], atol=1e-3), "the adapter must change the output"
    assert not np.allclose(stock_unscaled, recipe["frames"], atol=1e-3), "alpha = rank must be visibly wrong here"
    np.testing.assert_allclose(flywheel, recipe["frames"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(flywheel, stock, rtol=0, atol=1e-5)

    # flywheel.train.adapter_io.load_adapter checks the loaded scaling against the card.
    load_adapter(tiny_pipe, imported.adapter_dir, "checked")
    try:
        assert adapter_scalings(tiny_pipe.transformer, "checked") == {ALPHA / RANK}
    finally:
        remove_adapter(tiny_pipe)
    np.testing.assert_allclose(_generate(tiny_pipe), recipe["base_frames"], rtol=0, atol=1e-6)

    # The same source and arguments give the same bytes; an imported adapter re-imports without --alpha.
    again = import_adapter(source, tiny_pipe.transformer, tmp_path / "again", base_model=base, alpha=ALPHA)
    for name in (ADAPTER_WEIGHTS, "adapter_card.json"):
        assert (again.adapter_dir / name).read_bytes() == (imported.adapter_dir / name).read_bytes(), name
    reimported = import_adapter(imported.adapter_dir, tiny_pipe.transformer, tmp_path / "re", base_model=base)
    assert reimported.card["alpha"] == ALPHA and reimported.card["source"]["alpha_from"] == "its lora_adapter_metadata"
    assert load_file(reimported.adapter_dir / ADAPTER_WEIGHTS).keys() == load_file(imported.adapter_dir / ADAPTER_WEIGHTS).keys()


def test_peft_adapter_directory_imports_with_its_own_alpha(tiny_pipe, recipe, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=RECIPE_TARGETS, use_dora=recipe["method"] == "dora")
    model = get_peft_model(copy.deepcopy(tiny_pipe.transformer), config)
    result = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in recipe["peft_state"].items()})
    assert not result.unexpected_keys
    model.save_pretrained(tmp_path / "peft")

    imported = import_adapter(tmp_path / "peft", tiny_pipe.transformer, tmp_path / "imported",
                              base_model=declared_base_model(tiny_pipe))
    assert imported.card["source"]["format"] == "peft" and imported.card["source"]["alpha_from"] == "adapter_config.json"
    assert set(imported.card["source"]["files_sha256"]) == {"adapter_config.json", "adapter_model.safetensors"}
    assert imported.card["target_modules"] == sorted(RECIPE_TARGETS)
    np.testing.assert_allclose(_flywheel_frames(tiny_pipe, imported.adapter_dir), recipe["frames"], rtol=0, atol=1e-5)

    with pytest.raises(DataError, match=r"records lora_alpha=8 but --alpha 16"):
        import_adapter(tmp_path / "peft", tiny_pipe.transformer, tmp_path / "conflict",
                       base_model=declared_base_model(tiny_pipe), alpha=16)


def _doctored(recipe, tmp_path, edit, metadata=None):
    """The recipe file with `edit` applied to its tensors, written as a new .safetensors file."""
    state = load_file(recipe["file"])
    edit(state)
    path = tmp_path / "doctored" / ADAPTER_WEIGHTS
    path.parent.mkdir(exist_ok=True)
    save_file(state, path, metadata=metadata)
    return path


def _refusal(pipe, path, tmp_path, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        import_adapter(path, pipe.transformer, tmp_path / "out", base_model=declared_base_model(pipe),
                       **{"alpha": ALPHA, **kwargs})
    assert not (tmp_path / "out").exists()
    return str(err.value)


MODULE = "transformer.transformer_blocks.0.attn1.to_q"


def test_a_module_the_base_lacks_is_refused_by_name(tiny_pipe, recipe, tmp_path):
    def move(state):
        for key in [k for k in state if k.startswith(MODULE + ".")]:
            state[key.replace("transformer_blocks.0.", "transformer_blocks.99.")] = state.pop(key)

    message = _refusal(tiny_pipe, _doctored(recipe, tmp_path, move), tmp_path)
    assert "transformer_blocks.99.attn1.to_q" in message and "does not have" in message


def test_a_wrong_shape_is_refused_by_name(tiny_pipe, recipe, tmp_path):
    def shrink(state):
        state[f"{MODULE}.lora.down.weight"] = state[f"{MODULE}.lora.down.weight"][:, :16].contiguous()

    message = _refusal(tiny_pipe, _doctored(recipe, tmp_path, shrink), tmp_path)
    assert "transformer_blocks.0.attn1.to_q.lora_A.weight (4, 16)" in message and "needs (4, 32)" in message


def test_a_half_module_and_a_partial_target_list_are_refused(tiny_pipe, recipe, tmp_path):
    message = _refusal(tiny_pipe, _doctored(recipe, tmp_path, lambda s: s.pop(f"{MODULE}.lora.up.weight")), tmp_path)
    assert "transformer_blocks.0.attn1.to_q" in message and "without both lora_A and lora_B" in message

    # A file whose metadata targets every to_q but holds weights for all but one: peft would leave that layer
    # at its initial values without a word.
    imported = import_adapter(recipe["file"], tiny_pipe.transformer, tmp_path / "whole",
                              base_model=declared_base_model(tiny_pipe), alpha=ALPHA)
    with safe_open(imported.adapter_dir / ADAPTER_WEIGHTS, framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
    partial = load_file(imported.adapter_dir / ADAPTER_WEIGHTS)
    for key in [k for k in partial if k.startswith(MODULE + ".")]:
        del partial[key]
    path = tmp_path / "partial" / ADAPTER_WEIGHTS
    path.parent.mkdir()
    save_file(partial, path, metadata=metadata)
    message = _refusal(tiny_pipe, path, tmp_path, alpha=None)
    assert "transformer_blocks.0.attn1.to_q" in message and "has no weights for" in message


def test_rank_conflicts_and_foreign_files_are_refused(tiny_pipe, recipe, tmp_path):
    assert "not the declared --rank 8" in _refusal(tiny_pipe, recipe["file"], tmp_path, rank=8)
    # The check sees through adapters already loaded in the pipeline (a long-lived process may hold some).
    tiny_pipe.load_lora_weights(str(recipe["file"].parent), weight_name=ADAPTER_WEIGHTS, adapter_name="loaded")
    try:
        import_adapter(recipe["file"], tiny_pipe.transformer, tmp_path / "ok",
                       base_model=declared_base_model(tiny_pipe), alpha=ALPHA, rank=RANK)
    finally:
        remove_adapter(tiny_pipe)

    pickled = tmp_path / "pickled" / ADAPTER_WEIGHTS  # pickle bytes under the safetensors name
    pickled.parent.mkdir()
    torch.save(load_file(recipe["file"]), pickled)
    assert "not a readable safetensors LoRA file" in _refusal(tiny_pipe, pickled, tmp_path)
    bin_file = pickled.with_name("pytorch_lora_weights.bin")
    bin_file.write_bytes(pickled.read_bytes())
    assert "only .safetensors" in _refusal(tiny_pipe, bin_file, tmp_path)
