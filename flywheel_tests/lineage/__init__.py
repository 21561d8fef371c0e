"""Shared helpers for the lineage tests: real adapter dirs and one real MLflow sqlite store per session.

The schema of a fresh MLflow database takes seconds to create, so tests share one store and keep
apart by using their own domain (each domain is its own experiment and registered model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

OVERRIDE_ENV = ("FLYWHEEL_MLFLOW_URI", "MLFLOW_TRACKING_URI", "FLYWHEEL_MLFLOW_ARTIFACT_ROOT", "FLYWHEEL_MLFLOW_UI_URL")
BASE_MODEL = "nvidia/Cosmos-Predict2.5-2B"
BASE_REVISION = "0123456789abcdef0123456789abcdef01234567"

_shared: dict[str, Path] = {}


def clear_tracking_env() -> None:
    """Tests must never write to a tracking server configured in the developer's shell."""
    for name in OVERRIDE_ENV:
        os.environ.pop(name, None)


def shared_home(tmp_path_factory) -> Path:
    """One flywheel home with an initialised MLflow store for the whole test session."""
    from flywheel.lineage.tracking import ensure_tracking_store

    clear_tracking_env()
    if "home" not in _shared:
        home = tmp_path_factory.mktemp("lineage") / "home"
        ensure_tracking_store(home)
        _shared["home"] = home
    return _shared["home"]


def make_adapter(root: Path, seed: int, rank: int = 4, method: str = "lora", steps: int = 5,
                 parent: Path | None = None, external: bool = False, base_revision: str = BASE_REVISION) -> Path:
    """A small real adapter dir: LoRA A/B matrices in safetensors plus its adapter card.

    `parent`: the adapter dir training continued (the card names it by its weights' sha256, as
    flywheel.train.lora writes it); `external`: a card as flywheel.train.adapter_import writes it."""
    from flywheel.store import hash_file

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {
        "transformer.blocks.0.attn1.to_q.lora_A.weight": rng.standard_normal((rank, 32)).astype(np.float32),
        "transformer.blocks.0.attn1.to_q.lora_B.weight": rng.standard_normal((32, rank)).astype(np.float32),
    }
    save_file(tensors, str(root / "pytorch_lora_weights.safetensors"))
    card = {
        "method": method,
        "rank": rank,
        "alpha": 2 * rank,
        "scaling": 2.0,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "base_model": {"model_id": BASE_MODEL, "revision": base_revision},
        "num_trainable_parameters": 2 * rank * 32,
        "steps": steps,
        "final_loss": 0.25,
        "lineage": "trained" if parent is None else "continued",
        "parent_adapter": None if parent is None else {
            "weights_sha256": hash_file(Path(parent) / "pytorch_lora_weights.safetensors")},
    }
    if external:
        card |= {"lineage": "external", "steps": None, "final_loss": None, "training_data": None,
                 "source": {"format": "diffusers-lora", "file": "pytorch_lora_weights.safetensors",
                            "sha256": hash_file(root / "pytorch_lora_weights.safetensors"), "alpha_from": "--alpha"}}
    (root / "adapter_card.json").write_text(json.dumps(card, indent=1))
    return root
