"""Adapter files on disk: two identical trainings write the same bytes, and the peft config in the weights
file holds only what peft 0.9.0 (MIN_PEFT_VERSION) can read, with nothing lost when it is rebuilt."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flywheel.train import TrainConfig, train_adapter
from flywheel.train.adapter_io import (
    ADAPTER_WEIGHTS,
    PEFT_0_9_LORA_FIELDS,
    canonicalize_safetensors_header,
    lora_config_values,
)
from flywheel.train.lora import lora_config
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)
from flywheel_tests.adapter_card import make_card

FEW_STEPS = dict(rank=4, alpha=8, steps=3, learning_rate=1e-2, warmup_steps=0, f_start=1.0, f_max=1.0, f_min=1.0,
                 checkpoint_every=1000)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def _metadata(adapter_dir) -> dict:
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, framework="pt") as f:
        packed = json.loads(f.metadata()["lora_adapter_metadata"])
    return {k.removeprefix("transformer."): v for k, v in packed.items()}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_two_identical_trainings_write_byte_identical_adapters(tiny_pipe, tiny_latent_cache, tmp_path, method):
    config = TrainConfig(method=method, **FEW_STEPS)
    first = train_adapter(tiny_latent_cache, tiny_pipe, config, tmp_path / "first", progress=lambda _: None)
    second = train_adapter(tiny_latent_cache, tiny_pipe, config, tmp_path / "second", progress=lambda _: None)
    names = sorted(p.name for p in first.adapter_dir.iterdir())
    assert names == sorted(p.name for p in second.adapter_dir.iterdir())
    assert {ADAPTER_WEIGHTS, "adapter_card.json", "loss.csv", "loss.png"} <= set(names)
    for name in names:  # the whole directory: weights, peft config, card, loss curve
        assert (first.adapter_dir / name).read_bytes() == (second.adapter_dir / name).read_bytes(), name
    # What makes it so, checked directly (a random order can match once by chance): the header's metadata
    # keys are sorted and the peft config's target_modules are a sorted list.
    metadata = _header(first.adapter_dir / ADAPTER_WEIGHTS)["__metadata__"]
    assert list(metadata) == sorted(metadata) == ["format", "lora_adapter_metadata"]
    assert _metadata(first.adapter_dir)["target_modules"] == sorted(config.target_modules)


def test_canonical_header_is_the_same_for_every_save_and_keeps_the_tensors(tmp_path):
    tensors = {"b.lora_B.weight": torch.randn(8, 2), "a.lora_A.weight": torch.randn(2, 8), "m": torch.arange(5.0)}
    metadata = {f"key{i}": f"value {i} é" for i in range(12)}
    saved = []
    for i in range(6):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, path, metadata=metadata)
        canonicalize_safetensors_header(path)
        saved.append(path.read_bytes())
        assert list(_header(path)["__metadata__"]) == sorted(metadata)
        with safe_open(path, framework="pt") as f:
            assert f.metadata() == metadata
        assert all(torch.equal(load_file(path)[k], v) for k, v in tensors.items())
    assert len(set(saved)) == 1
    assert int.from_bytes(saved[0][:8], "little") % 8 == 0  # the header length, as the format pads it

    # A header of another length (another writer's whitespace) is rewritten whole, to the same bytes.
    length = int.from_bytes(saved[0][:8], "little")
    roomy = json.dumps(json.loads(saved[0][8:8 + length]), indent=4, ensure_ascii=False).encode()
    roomy = roomy.ljust(-(-len(roomy) // 8) * 8, b" ")
    path = tmp_path / "roomy.safetensors"
    path.write_bytes(len(roomy).to_bytes(8, "little") + roomy + saved[0][8 + length:])
    assert load_file(path).keys() == tensors.keys()
    canonicalize_safetensors_header(path)
    assert path.read_bytes() == saved[0]


@pytest.mark.parametrize("method,rank,alpha", [("lora", 4, 8.0), ("dora", 8, 8.0), ("lora", 16, 32.0)])
def test_peft_config_carries_only_fields_old_peft_has_and_rebuilds_exactly(tiny_pipe, tmp_path, method, rank, alpha):
    from peft import LoraConfig

    from flywheel.train.adapter_io import remove_adapter, save_adapter
    from flywheel.train.lora import add_training_adapter

    config = TrainConfig(method=method, rank=rank, alpha=alpha)
    add_training_adapter(tiny_pipe.transformer, config)
    try:
        trained = tiny_pipe.transformer.peft_config["default"]
        save_adapter(tiny_pipe.transformer, tmp_path / "adapter", make_card(method, rank, alpha))
    finally:
        remove_adapter(tiny_pipe)
    written = _metadata(tmp_path / "adapter")
    # Identity always (r = lora_alpha = 8 is also peft's default), DoRA only when used, nothing else.
    assert set(written) == {"peft_type", "r", "lora_alpha", "target_modules"} | ({"use_dora"} if method == "dora" else set())
    # An older peft drops the kwargs its LoraConfig lacks (peft.config._check_and_remove_unused_kwargs; diffusers'
    # `LoraConfig(**metadata)` fails on them instead): peft 0.9.0 has every field written, and what the config
    # is built from them is the trained config, field for field.
    assert set(written) <= PEFT_0_9_LORA_FIELDS
    for rebuilt in (LoraConfig(**written), LoraConfig.from_peft_type(**written)):
        assert lora_config_values(rebuilt) == lora_config_values(trained) == lora_config_values(lora_config(config))
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(written))
    assert lora_config_values(LoraConfig.from_pretrained(str(tmp_path / "peft"))) == lora_config_values(trained)

