"""Resumable training checkpoints: `<work_dir>/checkpoint-<step>/`, each written whole or not at all.

A checkpoint directory holds:

    adapter.safetensors   the trainable adapter tensors (peft layout, fp32)
    state.pt              optimizer, LR scheduler, every RNG state (torch global + the run's own
                          generators), step, loss history
    config.json           the TrainConfig that wrote it (a resume under another config is refused)

It is filled in a hidden temp directory and renamed into place, so a run killed at any moment leaves
either a complete checkpoint or a temp directory that the next start removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "checkpoint-"
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"


def checkpoint_path(work_dir: Path, step: int) -> Path:
    return Path(work_dir) / f"{PREFIX}{step}"


def list_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    for path in Path(work_dir).glob(f"{PREFIX}*"):
        suffix = path.name.removeprefix(PREFIX)
        if suffix.isdigit() and all((path / f).is_file() for f in (ADAPTER_FILE, STATE_FILE, CONFIG_FILE)):
            found.append((int(suffix), path))
    return sorted(found)


def latest_checkpoint(work_dir: Path) -> Path | None:
    found = list_checkpoints(work_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(work_dir: Path) -> None:
    """Temp directories of checkpoints whose writer was killed."""
    for path in Path(work_dir).glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    work_dir: Path,
    step: int,
    adapter_weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoint-<step>` atomically, then drop all but the newest `keep` checkpoints."""
    work_dir = Path(work_dir)
    final = checkpoint_path(work_dir, step)
    tmp = work_dir / f".{PREFIX}{step}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter_weights.items()}, tmp / ADAPTER_FILE)
        torch.save({**state, "step": step}, tmp / STATE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        if final.exists():
            # Same step written before a kill: the run is deterministic, so the old one is as good.
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(adapter weights, training state, config dict) of a checkpoint directory."""
    path = Path(path)
    try:
        weights = load_file(path / ADAPTER_FILE)
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        config = json.loads((path / CONFIG_FILE).read_text())
    except Exception as e:
        raise ValueError(f"{path}: unreadable training checkpoint ({e}); delete this directory to resume from an older one") from e
    return weights, state, config
