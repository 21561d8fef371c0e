"""Adapters on disk: diffusers LoRA layout, loadable by the stock `pipe.load_lora_weights`.

An adapter directory holds:

    pytorch_lora_weights.safetensors   keys `transformer.<module>.lora.down.weight` / `.lora.up.weight`
                                       (+ `.lora_magnitude_vector` for DoRA); the safetensors header
                                       carries diffusers' `lora_adapter_metadata`: the peft LoraConfig's
                                       identity (peft_type, r, lora_alpha, target_modules) and its other
                                       non-default fields only, so an alpha != rank survives loading and
                                       peft >= MIN_PEFT_VERSION can read it.
    adapter_card.json                  what the adapter is: method, rank, alpha, base model, training data
                                       (or, for an imported adapter, its source), steps, final loss, seed.
    loss.csv, loss.png                 the training curve (written by the training loop).

The same weights and card give the same bytes (no times, sorted JSON, a canonical safetensors header), so an
adapter's digest depends only on what it is.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.errors import DataError
from flywheel.store import atomic_path

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_CARD = "adapter_card.json"
TRAINING_ADAPTER_NAME = "default"  # the name `transformer.add_adapter` uses; training owns it

# The oldest peft that reads every adapter flywheel writes: diffusers rebuilds the config with
# `LoraConfig(**metadata)`, which fails on any field the installed peft lacks, and `use_dora` arrived in 0.9.0.
# A plain LoRA file carries no `use_dora` and reads with any peft that diffusers supports.
MIN_PEFT_VERSION = "0.9.0"
# The fields of peft 0.9.0's LoraConfig (read from that release: benchmarks/peft_compat.py lists them again).
# The metadata may carry only these, so a field a later peft added is never written and never silently dropped
# by an older peft's forward-compatibility filter.
PEFT_0_9_LORA_FIELDS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha", "lora_dropout",
    "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern", "revision",
    "target_modules", "task_type", "use_dora", "use_rslora",
})
# Written always: what the adapter is, even where a value equals peft's default (r = lora_alpha = 8).
IDENTITY_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")
# Bookkeeping fields that do not change what the weights compute; never written.
BOOKKEEPING_FIELDS = frozenset({"peft_version", "base_model_name_or_path", "revision", "inference_mode",
                                "task_type", "auto_mapping", "runtime_config"})


def _json_ready(value: Any) -> Any:
    """A config value as canonical JSON data: sets as sorted lists, enums as their values."""
    if isinstance(value, (set, frozenset)):
        return sorted(_json_ready(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _json_ready(dataclasses.asdict(value))
    return value


def lora_config_values(config) -> dict[str, Any]:
    """A peft LoraConfig's fields as canonical JSON data."""
    return _json_ready(config.to_dict())


def non_default_lora_fields(config) -> dict[str, Any]:
    """The fields of a peft LoraConfig that differ from `LoraConfig()`'s defaults (bookkeeping left out)."""
    from peft import LoraConfig

    values, defaults = lora_config_values(config), lora_config_values(LoraConfig())
    return {k: v for k, v in values.items() if k not in BOOKKEEPING_FIELDS and v != defaults.get(k)}


def portable_lora_config(config) -> dict[str, Any]:
    """The peft LoraConfig as adapter metadata: its identity plus its non-default fields, as sorted JSON data.

    `LoraConfig(**portable_lora_config(c))` rebuilds `c` with any peft >= MIN_PEFT_VERSION.
    """
    values = lora_config_values(config)
    portable = {k: values[k] for k in IDENTITY_FIELDS} | non_default_lora_fields(config)
    too_new = sorted(set(portable) - PEFT_0_9_LORA_FIELDS)
    if too_new:
        raise ValueError(f"LoraConfig fields {too_new} = {[portable[k] for k in too_new]} do not exist in peft "
                         f"{MIN_PEFT_VERSION}: a file carrying them fails to load with older peft; set only "
                         f"{sorted(PEFT_0_9_LORA_FIELDS)}")
    return dict(sorted(portable.items()))


def adapter_state_dict(transformer: torch.nn.Module, adapter_name: str = TRAINING_ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """The adapter's tensors in diffusers layout (what `save_lora_weights` expects for the transformer)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()}


def adapter_metadata(transformer: torch.nn.Module, adapter_name: str = TRAINING_ADAPTER_NAME) -> dict[str, Any]:
    """The adapter's peft LoraConfig as portable metadata: diffusers rebuilds the exact config (alpha included)."""
    return portable_lora_config(transformer.peft_config[adapter_name])


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite a safetensors file's JSON header with its `__metadata__` keys sorted.

    safetensors (0.8) writes `__metadata__` from a Rust HashMap, in a random order per save
    (safetensors/safetensors#584, open), so identical weights get different bytes. The tensor entries and
    data are kept as they are; the header is re-serialised compactly and space-padded to 8 bytes, as the
    format specifies.
    """
    path = Path(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None)
    canonical = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
    text = json.dumps(canonical, separators=(",", ":"), ensure_ascii=False).encode()
    padded = text.ljust(-(-len(text) // 8) * 8, b" ")
    if len(padded) == length:  # the usual case: the same text reordered, rewritten in place
        with open(path, "r+b") as f:
            f.seek(8)
            f.write(padded)
        return
    with atomic_path(path) as tmp, open(path, "rb") as src, open(tmp, "wb") as dst:
        src.seek(8 + length)
        dst.write(len(padded).to_bytes(8, "little") + padded)
        while block := src.read(1 << 24):
            dst.write(block)


def write_adapter_weights(out_dir: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write diffusers-layout transformer LoRA tensors (keys without the `transformer.` prefix) and their
    portable LoraConfig metadata as `out_dir/pytorch_lora_weights.safetensors`, with the stock diffusers
    writer, then make its header canonical. Returns the file."""
    from diffusers import Cosmos2_5_PredictBasePipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    Cosmos2_5_PredictBasePipeline.save_lora_weights(
        save_directory=out_dir,
        transformer_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()},
        transformer_lora_adapter_metadata=dict(metadata),
        weight_name=ADAPTER_WEIGHTS,
        safe_serialization=True,
    )
    canonicalize_safetensors_header(out_dir / ADAPTER_WEIGHTS)
    return out_dir / ADAPTER_WEIGHTS


def write_card(out_dir: Path, card: AdapterCard | dict) -> Path:
    """adapter_card.json, validated by AdapterCard and written with sorted keys (the same card, the same bytes)."""
    card = card if isinstance(card, AdapterCard) else AdapterCard.model_validate(card)
    return card.write(out_dir)


def save_adapter(transformer: torch.nn.Module, out_dir: Path, card: dict, adapter_name: str = TRAINING_ADAPTER_NAME) -> Path:
    """Write the adapter weights (diffusers layout + metadata) and its card into `out_dir`, then verify them."""
    out_dir = Path(out_dir)
    metadata = adapter_metadata(transformer, adapter_name)
    write_adapter_weights(out_dir, adapter_state_dict(transformer, adapter_name), metadata)
    write_card(out_dir, card)
    verify_saved_adapter(out_dir, rank=metadata["r"], alpha=metadata["lora_alpha"],
                         use_dora=bool(metadata.get("use_dora", False)))
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


CARD_FORMAT = "flywheel-adapter/1"


class BaseModelRef(BaseModel):
    """The frozen model an adapter is for."""

    model_config = ConfigDict(extra="allow")

    model_id: str
    revision: str | None = None
    preset: str | None = None
    dtype: str | None = None


class ParentRef(BaseModel):
    """The adapter training continued from, by its weights' digest (a path would not survive a moved home)."""

    model_config = ConfigDict(extra="allow")

    weights_sha256: str


class AdapterCard(BaseModel):
    """adapter_card.json: what an adapter is and where it came from. The one reader (`read`) and writer (`write`)
    of the card: training, import, registration, generation and lineage all go through it."""

    model_config = ConfigDict(extra="allow")  # a newer flywheel's extra fields are kept, not refused

    format: str = CARD_FORMAT
    lineage: Literal["trained", "continued", "external"] = "trained"
    method: Literal["lora", "dora"]
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    scaling: float
    target_modules: list[str]
    base_model: BaseModelRef
    num_trainable_parameters: int
    training_data: dict[str, Any] | None = None   # trained: the latent cache it learned from
    steps: int | None = None
    final_loss: float | None = None
    last_step_loss: float | None = None
    seed: int | None = None
    parent_adapter: ParentRef | None = None        # continued: the adapter training started from
    source: dict[str, Any] | None = None           # external: the imported file, its digest, where alpha came from
    config: dict[str, Any] | None = None           # trained: the TrainConfig
    training_mode: dict[str, Any] | None = None    # trained: the checkpointing mode and why it was chosen

    @classmethod
    def read(cls, adapter_dir: str | os.PathLike) -> AdapterCard:
        path = Path(adapter_dir) / ADAPTER_CARD
        if not path.is_file():
            raise DataError(f"{adapter_dir}: no {ADAPTER_CARD}; this is not a flywheel adapter directory (an adapter "
                            "trained elsewhere: `flywheel adapters import` it)")
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise DataError(f"{path}: not a valid adapter card ({problems}); rewrite it from the training run or "
                            "import the adapter again") from None

    def write(self, out_dir: str | os.PathLike) -> Path:
        """Sorted keys, no nulls beyond the model's own fields: the same card gives the same bytes."""
        path = Path(out_dir) / ADAPTER_CARD
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path


def read_card(adapter_dir: Path) -> AdapterCard:
    return AdapterCard.read(adapter_dir)


def adapter_scalings(transformer: torch.nn.Module, adapter_name: str) -> set[float]:
    """The distinct LoRA scalings (alpha / r) of an adapter's layers in a model."""
    from peft.tuners.lora import LoraLayer

    return {m.scaling[adapter_name] for m in transformer.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling}


def load_adapter(pipe, adapter_dir: Path, adapter_name: str) -> AdapterCard:
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
    expected = card.alpha / card.rank
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
