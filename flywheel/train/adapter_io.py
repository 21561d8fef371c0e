"""Adapters on disk: diffusers LoRA layout, loadable by the stock `pipe.load_lora_weights`.

An adapter directory holds:

    pytorch_lora_weights.safetensors   keys `transformer.<module>.lora.down.weight` / `.lora.up.weight`
                                       (+ `.lora_magnitude_vector` for DoRA), fp32; the safetensors
                                       header carries diffusers' `lora_adapter_metadata` (the peft
                                       LoraConfig: r, lora_alpha, use_dora, target_modules), so an
                                       alpha != rank survives loading.
    adapter_card.json                  what the adapter is: method, rank, alpha, base model, training data,
                                       steps, final loss, seed, full training config.
    loss.csv, loss.png                 the training curve (written by the training loop).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CARD = "adapter_card.json"
TRAINING_ADAPTER_NAME = "default"  # the name `transformer.add_adapter` uses; training owns it


def adapter_state_dict(transformer: torch.nn.Module, adapter_name: str = TRAINING_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers layout (what `save_lora_weights` expects for the transformer)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()}


def adapter_metadata(transformer: torch.nn.Module, adapter_name: str = TRAINING_ADAPTER_NAME) -> dict[str, Any]:
    """The peft LoraConfig as a dict: diffusers rebuilds the exact config (alpha included) from it on load."""
    return copy.deepcopy(transformer.peft_config[adapter_name].to_dict())


def save_adapter(transformer: torch.nn.Module, out_dir: Path, card: dict, adapter_name: str = TRAINING_ADAPTER_NAME) -> Path:
    """Write the adapter weights (diffusers layout + metadata) and its card into `out_dir`, then verify them."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = adapter_metadata(transformer, adapter_name)
    Cosmos2_5_PredictBasePipeline.save_lora_weights(
        save_directory=out_dir,
        transformer_lora_layers=adapter_state_dict(transformer, adapter_name),
        transformer_lora_adapter_metadata=metadata,
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
    )
    (out_dir / ADAPTER_CARD).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    verify_saved_adapter(out_dir, rank=metadata["r"], alpha=metadata["lora_alpha"], use_dora=metadata["use_dora"])
    return out_dir


def read_saved_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(diffusers-layout state dict, lora adapter metadata) exactly as the stock loader sees them."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter directory (no {ADAPTER_WEIGHTS}); train an adapter first")
    state_dict, metadata = Cosmos2_5_PredictBasePipeline.lora_state_dict(str(adapter_dir), weight_name=ADAPTER_WEIGHTS,
                                                                           return_lora_metadata=True)
    return state_dict, metadata or {}


def verify_saved_adapter(adapter_dir: Path, *, rank: int, alpha: float, use_dora: bool) -> None:
    """Fail loudly if what the stock loader would read differs from what was trained (rank, alpha, DoRA)."""
    state_dict, metadata = read_saved_adapter(adapter_dir)
    saved = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
    problems = []
    if saved.get("r") != rank:
        problems.append(f"r={saved.get('r')} (expected {rank})")
    if saved.get("lora_alpha") != alpha:
        problems.append(f"lora_alpha={saved.get('lora_alpha')} (expected {alpha})")
    if bool(saved.get("use_dora")) != use_dora:
        problems.append(f"use_dora={saved.get('use_dora')} (expected {use_dora})")
    if use_dora and not any("lora_magnitude_vector" in k for k in state_dict):
        problems.append("DoRA magnitude vectors are missing")
    if not any(k.startswith("transformer.") for k in state_dict):
        problems.append("no `transformer.` LoRA weights")
    if problems:
        raise ValueError(f"{adapter_dir / ADAPTER_WEIGHTS}: saved adapter does not round-trip: {'; '.join(problems)}")


def read_card(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / ADAPTER_CARD
    if not path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: no {ADAPTER_CARD}; this is not a flywheel adapter directory")
    return json.loads(path.read_text())


def adapter_scalings(transformer: torch.nn.Module, adapter_name: str) -> set[float]:
    """The distinct LoRA scalings (alpha / r) of an adapter's layers in a model."""
    from peft.tuners.lora import LoraLayer

    return {m.scaling[adapter_name] for m in transformer.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def load_adapter(pipe, adapter_dir: Path, adapter_name: str) -> dict[str, Any]:
    """Load a saved adapter into `pipe` with the stock diffusers loader and make it the active one.

    Returns the adapter card. Checks that the loaded scaling is the card's alpha / rank.
    """
    adapter_dir = Path(adapter_dir)
    card = read_card(adapter_dir)
    if adapter_name in getattr(pipe.transformer, "peft_config", {}):
        raise ValueError(f"adapter name {adapter_name!r} is already loaded in this pipeline; "
                         "remove_adapter(pipe, name) first or pick another name")
    pipe.load_lora_weights(str(adapter_dir), weight_name=ADAPTER_WEIGHTS, adapter_name=adapter_name)
    pipe.set_adapters(adapter_name)
    expected = card["alpha"] / card["rank"]
    got = adapter_scalings(pipe.transformer, adapter_name)
    if got != {expected}:
        remove_adapter(pipe, adapter_name)
        raise ValueError(f"{adapter_dir}: loaded LoRA scaling {sorted(got)} != alpha/rank = {expected}; "
                         "the adapter's lora_adapter_metadata is missing or wrong, re-save it with save_adapter")
    return card


def remove_adapter(pipe, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all with None); with none left, the transformer gets its plain layers back."""
    transformer = pipe.transformer
    loaded = list(getattr(transformer, "peft_config", {}) or {})
    if adapter_name is not None and adapter_name not in loaded:
        raise ValueError(f"adapter {adapter_name!r} is not loaded (loaded: {loaded})")
    if adapter_name is not None and len(loaded) > 1:
        transformer.delete_adapters(adapter_name)
        return
    if loaded or _has_peft_layers(transformer):
        transformer.unload_lora()


def _has_peft_layers(module: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())
