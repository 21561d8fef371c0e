"""Import a LoRA / DoRA adapter trained outside flywheel as a flywheel adapter directory.

Sources read:

- a diffusers LoRA file, `pytorch_lora_weights.safetensors` (or a directory holding it), as the stock
  `Cosmos2_5_PredictBasePipeline.save_lora_weights` writes it. The diffusers examples/cosmos recipe saves
  `convert_state_dict_to_diffusers(get_peft_model_state_dict(dit))` WITHOUT `lora_adapter_metadata`, so its
  file does not say its alpha: diffusers then loads it with alpha = rank (scale 1) whatever it was trained
  with. Such a file is refused unless the caller gives the alpha.
- a peft adapter directory: `adapter_config.json` + `adapter_model.safetensors` (`PeftModel.save_pretrained`).

Before anything is written the file's LoRA modules are checked against the base transformer: every module
exists and is a linear layer, every A/B (and DoRA magnitude) has the shape that layer needs, the rank is one
number, and a config's target_modules select exactly the modules the file has weights for. diffusers and peft
would otherwise skip unknown keys or leave targeted layers at their initial values, with a warning at most.

The output has the layout of a trained adapter (flywheel.train.adapter_io): the same tensors in diffusers
layout with portable metadata (so `pipe.load_lora_weights` scales it by alpha / rank) and an adapter card with
`lineage: external` and the source's digest. The same source and arguments give the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from flywheel.errors import DataError
from flywheel.store import hash_file
from flywheel.train.adapter_io import (
    AdapterCard,
    ADAPTER_WEIGHTS,
    lora_config_values,
    non_default_lora_fields,
    portable_lora_config,
    verify_saved_adapter,
    write_adapter_weights,
    write_card,
)

LINEAGE_EXTERNAL = "external"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes its keys
DIFFUSERS_PREFIX = "transformer."  # how save_lora_weights prefixes the transformer's keys
# LoraConfig fields an imported adapter may set away from peft's defaults: those that flywheel's adapters have.
# Anything else (use_rslora, rank/alpha patterns, lora_bias, modules_to_save, ...) changes what the weights
# compute in a way an adapter card's single method / rank / alpha cannot say.
SUPPORTED_FIELDS = frozenset({"peft_type", "r", "lora_alpha", "target_modules", "use_dora", "init_lora_weights",
                              "lora_dropout"})
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_SHOWN = 5  # keys named in a refusal; the message gives the count of the rest


@dataclasses.dataclass(frozen=True)
class ImportedAdapter:
    adapter_dir: Path
    card: dict[str, Any]
    source_path: Path  # the weights file read (resolved)


@dataclasses.dataclass
class _Source:
    weights_file: Path
    kind: str  # "diffusers-lora" | "peft"
    state: dict[str, torch.Tensor]  # peft layout, no prefix: <module>.lora_A.weight / .lora_B.weight / .lora_magnitude_vector
    config: dict[str, Any] | None  # the LoraConfig kwargs the source carries, if any
    config_origin: str | None  # where `config` came from, for messages and the card
    digests: dict[str, str]  # sha256 of each source file read


def declared_base_model(pipe) -> dict[str, Any]:
    """The base model record of a pipeline built by flywheel.model.presets.load_pipeline (as a trained card's)."""
    preset = getattr(pipe, "flywheel_preset", None)
    if preset is None:
        raise ValueError("declared_base_model: the pipeline has no flywheel_preset; build it with "
                         "flywheel.model.presets.load_pipeline")
    return {"model_id": preset.model_id, "revision": preset.revision, "preset": preset.name, "dtype": preset.dtype}


def import_adapter(source: Path, transformer: torch.nn.Module, out_dir: Path, *, base_model: Mapping[str, Any],
                   alpha: float | None = None, rank: int | None = None) -> ImportedAdapter:
    """Check an external LoRA/DoRA against `transformer` and write it as a flywheel adapter into `out_dir`.

    `source`: a diffusers LoRA .safetensors file, a directory holding pytorch_lora_weights.safetensors, or a peft
    adapter directory. `out_dir` must be new or empty (e.g. an ArtifactStore.write temp dir). `base_model` is
    the base the adapter is declared for (model_id and revision at least; see declared_base_model); it goes into
    the card. `alpha` is required when the source does not record its own; `alpha` and `rank`, when given, must
    agree with what the source records. Raises DataError naming the file and what to do; writes nothing then.
    """
    missing = [k for k in ("model_id", "revision") if not base_model.get(k)]
    if missing:
        raise ValueError(f"import_adapter: base_model lacks {missing}; pass the declared base model's model_id "
                         "and revision (declared_base_model(pipe) gives them)")
    src = _read_source(Path(source))
    modules = _modules_of(src)
    _check_against_base(src, modules, transformer)
    config = _source_config(src)
    found_rank = _rank_of(src, modules, config, rank)
    found_alpha, alpha_from = _alpha_of(src, config, alpha)
    use_dora = _uses_dora(src, modules, config)
    target_modules = _target_modules(src, modules, transformer, config)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: not empty; import into a new directory (adapters are immutable)")

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    lora_config = LoraConfig(r=found_rank, lora_alpha=found_alpha, target_modules=target_modules, use_dora=use_dora,
                             init_lora_weights=True)
    card = _external_card(src, lora_config, base_model, alpha_from)
    write_adapter_weights(out_dir, convert_state_dict_to_diffusers(_canonical_state(modules)),
                          portable_lora_config(lora_config))
    write_card(out_dir, card)
    verify_saved_adapter(out_dir, rank=found_rank, alpha=found_alpha, use_dora=use_dora)
    return ImportedAdapter(adapter_dir=out_dir, card=card.model_dump(mode="json"), source_path=src.weights_file)


def _external_card(src: _Source, lora_config, base_model: Mapping[str, Any], alpha_from: str) -> AdapterCard:
    """The adapter card of an import: what a trained card says about the adapter, and its source (what a trained
    adapter's card has and an import cannot know -- its training data, steps, loss -- stays empty)."""
    return AdapterCard(
        lineage=LINEAGE_EXTERNAL, method="dora" if lora_config.use_dora else "lora", rank=lora_config.r,
        alpha=lora_config.lora_alpha, scaling=lora_config.lora_alpha / lora_config.r,
        target_modules=sorted(lora_config.target_modules), base_model=dict(base_model),
        num_trainable_parameters=sum(t.numel() for t in src.state.values()),
        source={"format": src.kind, "file": src.weights_file.name, "sha256": src.digests[src.weights_file.name],
                "files_sha256": dict(sorted(src.digests.items())), "alpha_from": alpha_from,
                "rank_from": "tensor shapes", "config_from": src.config_origin})


# --- reading the source --------------------------------------------------------------------------


def _read_source(source: Path) -> _Source:
    if not source.exists():
        raise DataError(f"{source}: not found; give a diffusers LoRA file ({ADAPTER_WEIGHTS}) or a peft adapter "
                        f"directory ({PEFT_CONFIG} + {PEFT_WEIGHTS})")
    if source.is_dir() and (source / PEFT_CONFIG).is_file():
        return _read_peft_dir(source)
    if source.is_dir():
        if not (source / ADAPTER_WEIGHTS).is_file():
            raise DataError(f"{source}: holds neither {ADAPTER_WEIGHTS} (diffusers LoRA) nor {PEFT_CONFIG} (peft "
                            "adapter); point at the adapter file or its directory")
        source = source / ADAPTER_WEIGHTS
    if source.suffix != ".safetensors":
        raise DataError(f"{source}: only .safetensors adapters are imported (a pickled .bin/.pt file can run code "
                        "when loaded); convert it with safetensors.torch.save_file first")
    return _read_diffusers_file(source.resolve())


def _read_diffusers_file(path: Path) -> _Source:
    from diffusers import Cosmos2_5_PredictBasePipeline

    digest = hash_file(path)  # before parsing: the digest is of the bytes that were read
    try:
        state, metadata = Cosmos2_5_PredictBasePipeline.lora_state_dict(str(path.parent), weight_name=path.name,
                                                                          return_lora_metadata=True)
    except Exception as err:  # safetensors raises its own error types for a damaged or foreign file
        raise DataError(f"{path}: not a readable safetensors LoRA file ({type(err).__name__}: {err})") from err
    prefixed = [k for k in state if k.startswith(DIFFUSERS_PREFIX)]
    if prefixed and len(prefixed) != len(state):
        others = sorted(k for k in state if not k.startswith(DIFFUSERS_PREFIX))
        raise DataError(f"{path}: has LoRA weights for other components than the transformer ({_some(others)}); "
                        "flywheel adapts the transformer only: save its transformer_lora_layers alone")
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in state.items()}
    config = None
    if metadata:
        has_prefix = any(k.startswith(DIFFUSERS_PREFIX) for k in metadata)
        config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in metadata.items()
                  if k.startswith(DIFFUSERS_PREFIX) or not has_prefix}
    return _Source(path, "diffusers-lora", _to_peft_layout(state), config or None,
                   "its lora_adapter_metadata" if config else None, {path.name: digest})


def _read_peft_dir(directory: Path) -> _Source:
    from safetensors.torch import load_file

    directory = directory.resolve()
    weights = directory / PEFT_WEIGHTS
    if not weights.is_file():
        raise DataError(f"{directory}: has {PEFT_CONFIG} but no {PEFT_WEIGHTS}; only safetensors weights are "
                        "imported (save the peft model with safe_serialization=True)")
    digests = {PEFT_CONFIG: hash_file(directory / PEFT_CONFIG), PEFT_WEIGHTS: hash_file(weights)}
    try:
        config = json.loads((directory / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{directory / PEFT_CONFIG}: not valid JSON ({err})") from err
    if config.get("peft_type") != "LORA":
        raise DataError(f"{directory / PEFT_CONFIG}: peft_type {config.get('peft_type')!r}; only LORA adapters "
                        "(LoRA or DoRA) are imported")
    try:
        state = load_file(weights)
    except Exception as err:
        raise DataError(f"{weights}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in state.items()}
    return _Source(weights, "peft", _to_peft_layout(state), config, PEFT_CONFIG, digests)


def _to_peft_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers layout (`lora.down` / `lora.up`) to peft's (`lora_A` / `lora_B`) with diffusers' own mapping.

    Every key is mapped: `convert_state_dict_to_diffusers` renames only some modules (the attention
    projections, not `ff.net.*`), so one recipe file mixes both layouts; peft-layout keys pass unchanged.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(state)


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _modules_of(src: _Source) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"A": .., "B": .., "magnitude": ..}}; refuses keys that are not LoRA/DoRA tensors of a module."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in src.state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            foreign.append(key)
            continue
        part = {"lora_A.weight": "A", "lora_B.weight": "B"}.get(match["part"], "magnitude")
        modules.setdefault(match["module"], {})[part] = tensor
    if foreign:
        raise DataError(f"{src.weights_file}: keys that are not LoRA A/B or DoRA magnitude tensors: "
                        f"{_some(sorted(foreign))}; only plain LoRA/DoRA adapters are imported")
    if not modules:
        raise DataError(f"{src.weights_file}: holds no LoRA tensors")
    incomplete = sorted(f"{m} (has {'/'.join(sorted(p))})" for m, p in modules.items() if not {"A", "B"} <= set(p))
    if incomplete:
        raise DataError(f"{src.weights_file}: modules without both lora_A and lora_B: {_some(incomplete)}; "
                        "the file is truncated or damaged")
    with_magnitude = [m for m, p in modules.items() if "magnitude" in p]
    if with_magnitude and len(with_magnitude) != len(modules):
        lacking = sorted(m for m, p in modules.items() if "magnitude" not in p)
        raise DataError(f"{src.weights_file}: DoRA magnitude vectors for some modules only; missing for "
                        f"{_some(lacking)}")
    not_float = sorted(k for k, t in src.state.items() if not t.is_floating_point())
    if not_float:
        raise DataError(f"{src.weights_file}: non-float tensors {_some(not_float)}")
    return modules


def _canonical_state(modules: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors under the keys `get_peft_model_state_dict` gives a trained adapter (sorted)."""
    names = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
    return {f"{module}.{names[part]}": tensor.contiguous()
            for module, parts in sorted(modules.items()) for part, tensor in sorted(parts.items())}


# --- checks against the base model -----------------------------------------------------------------


def _base_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The transformer's modules by name, as a bare model has them (peft wrappers replaced by their base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: dict[str, torch.nn.Module] = {}
    wrappers: list[str] = []
    for name, module in transformer.named_modules():
        if any(name.startswith(w + ".") for w in wrappers):
            continue  # a loaded adapter's own sub-modules
        if isinstance(module, BaseTunerLayer):
            wrappers.append(name)
            module = module.get_base_layer()
        layers[name] = module
    return layers


def _check_against_base(src: _Source, modules: dict[str, dict[str, torch.Tensor]], transformer: torch.nn.Module) -> None:
    layers = _base_layers(transformer)
    absent, not_linear, wrong = [], [], []
    for name, parts in sorted(modules.items()):
        layer = layers.get(name)
        if layer is None:
            absent.append(name)
            continue
        if not isinstance(layer, torch.nn.Linear):
            not_linear.append(f"{name} ({type(layer).__name__})")
            continue
        a = parts["A"]
        r = a.shape[0] if a.ndim == 2 else None
        want = {"A": (r, layer.in_features), "B": (layer.out_features, r), "magnitude": (layer.out_features,)}
        for part, tensor in sorted(parts.items()):
            if tuple(tensor.shape) != want[part]:
                key = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}[part]
                wrong.append(f"{name}.{key} {tuple(tensor.shape)} (the base layer needs {want[part]})")
    problems = []
    if absent:
        problems.append(f"{len(absent)} module(s) the base transformer does not have: {_some(absent)}")
    if not_linear:
        problems.append(f"modules that are not linear layers: {_some(not_linear)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_some(wrong)}")
    if problems:
        raise DataError(f"{src.weights_file}: does not fit the base transformer ({'; '.join(problems)}); it was "
                        "trained for another base model: import it against that model's preset")


def _source_config(src: _Source) -> dict[str, Any] | None:
    """The source's LoraConfig as JSON data, refusing settings a flywheel adapter cannot carry."""
    if src.config is None:
        return None
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    kwargs = {k: v for k, v in src.config.items() if k in known}
    # Fields of a newer peft: harmless only when unset (peft itself drops them with a warning, assuming that).
    newer = sorted(k for k in set(src.config) - known if src.config[k] not in (None, False, {}, [], "", 0))
    if newer:
        raise DataError(f"{src.weights_file}: {src.config_origin} sets {newer}, unknown to the installed peft; "
                        "upgrade peft or re-export the adapter without them")
    try:
        config = LoraConfig(**kwargs)
    except (TypeError, ValueError) as err:
        raise DataError(f"{src.weights_file}: {src.config_origin} is not a valid LoraConfig ({err})") from err
    unsupported = sorted(set(non_default_lora_fields(config)) - SUPPORTED_FIELDS)
    if unsupported:
        values = {k: non_default_lora_fields(config)[k] for k in unsupported}
        raise DataError(f"{src.weights_file}: {src.config_origin} sets {values}; flywheel adapters are plain LoRA/DoRA "
                        f"with one rank and one alpha (settings {sorted(SUPPORTED_FIELDS)}), so it cannot be imported")
    return lora_config_values(config)


def _rank_of(src: _Source, modules: dict[str, dict[str, torch.Tensor]], config: dict | None, rank: int | None) -> int:
    ranks = {name: parts["A"].shape[0] for name, parts in modules.items()}
    distinct = sorted(set(ranks.values()))
    if len(distinct) > 1:
        by_rank = {r: sorted(m for m, v in ranks.items() if v == r) for r in distinct}
        raise DataError(f"{src.weights_file}: modules have different ranks "
                        f"({', '.join(f'r={r}: {_some(ms)}' for r, ms in by_rank.items())}); only one rank is imported")
    found = distinct[0]
    if config is not None and config["r"] != found:
        raise DataError(f"{src.weights_file}: {src.config_origin} says r={config['r']} but its tensors have rank "
                        f"{found}; the source is inconsistent, re-export it")
    if rank is not None and rank != found:
        raise DataError(f"{src.weights_file}: its tensors have rank {found}, not the declared --rank {rank}; "
                        "check that this is the adapter you meant, or drop --rank")
    return found


def _alpha_of(src: _Source, config: dict | None, alpha: float | None) -> tuple[float, str]:
    if config is not None:
        recorded = float(config["lora_alpha"])
        if alpha is not None and float(alpha) != recorded:
            raise DataError(f"{src.weights_file}: {src.config_origin} records lora_alpha={recorded:g} but --alpha "
                            f"{alpha:g} was given; drop --alpha (the file's own value is used) or fix the source")
        return recorded, src.config_origin or "source"
    if alpha is None:
        raise DataError(f"{src.weights_file}: carries no LoRA alpha (no lora_adapter_metadata in its safetensors "
                        "header, as the diffusers Cosmos recipe writes it); its strength alpha/rank cannot be "
                        "read from the file: pass --alpha with the lora_alpha it was trained with (the recipe's "
                        "--lora_alpha, 32 unless set)")
    if not alpha > 0:
        raise DataError(f"{src.weights_file}: --alpha must be > 0, got {alpha}")
    return float(alpha), "argument"


def _uses_dora(src: _Source, modules: dict[str, dict[str, torch.Tensor]], config: dict | None) -> bool:
    use_dora = any("magnitude" in parts for parts in modules.values())
    if config is not None and bool(config.get("use_dora", False)) != use_dora:
        raise DataError(f"{src.weights_file}: {src.config_origin} says use_dora={config.get('use_dora')} but the file "
                        f"{'has' if use_dora else 'has no'} DoRA magnitude vectors; the source is inconsistent, "
                        "re-export it")
    return use_dora


def _target_modules(src: _Source, modules: dict[str, dict[str, torch.Tensor]], transformer: torch.nn.Module,
                    config: dict | None) -> list[str]:
    """The target_modules to write: the source's own patterns when they select exactly the file's modules,
    else the modules' full names. Refuses a config that targets modules the file has no weights for (peft would
    leave them at their initial values) or misses modules it has weights for (peft would skip those)."""
    names = sorted(modules)
    patterns = config.get("target_modules") if config is not None else None
    if not patterns:
        return names
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    probe = LoraConfig(target_modules=patterns)
    selected = {n for n in _base_layers(transformer) if n and check_target_module_exists(probe, n)}
    without_weights = sorted(selected - set(modules))
    not_targeted = sorted(set(modules) - selected)
    if without_weights or not_targeted:
        parts = []
        if without_weights:
            parts.append(f"targets {len(without_weights)} module(s) it has no weights for ({_some(without_weights)})")
        if not_targeted:
            parts.append(f"has weights its target_modules do not select ({_some(not_targeted)})")
        raise DataError(f"{src.weights_file}: {src.config_origin} target_modules={patterns} {' and '.join(parts)}; "
                        "loading it would silently use part of the adapter: re-export it complete")
    return sorted(patterns) if isinstance(patterns, list) else names
