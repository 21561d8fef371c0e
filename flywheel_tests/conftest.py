"""Shared fixtures: real files only. No network: the Hugging Face Hub is switched off for every test."""

import os
import sys
from pathlib import Path

import pytest

# Test helpers start Python subprocesses (training workers, mlflow server, dagster): let them and this
# process keep bytecode caches even where the environment disables them, or each one recompiles its imports.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# The suite runs on pytest-xdist workers (pyproject addopts `-n 3`): one torch thread per worker and per process it
# starts, so the workers on two cores do not fight over twice as many threads (a tiny step is then ~4x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT / "datasets"


@pytest.fixture(scope="session")
def robot_datasets() -> Path:
    """The embedded datasets folder: the real Unitree G1 sample (g1_pick_bottle v3.0, g1_pick_bottle_v21) and the
    PushT samples. Tests copy before anything writes to them."""
    if not (DATASETS / "g1_pick_bottle" / "meta" / "info.json").is_file():
        pytest.fail(f"the G1 sample is missing from {DATASETS}; see datasets/README.md")
    return DATASETS


@pytest.fixture
def store(tmp_path):
    """An empty flywheel home for one test."""
    from flywheel.store import ArtifactStore

    return ArtifactStore(tmp_path / "home")


@pytest.fixture(scope="session")
def tiny_pipe():
    """The tiny preset pipeline, built once per session (real Cosmos 2.5 classes, toy size)."""
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from flywheel.model.presets import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def episode_cache(tmp_path_factory) -> Path:
    """Decoded real episodes, cached once per session so every test package decodes the videos once."""
    path = tmp_path_factory.getbasetemp() / "flywheel_episode_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def pusht_root() -> Path:
    """The embedded sample dataset (datasets/pusht)."""
    root = REPO_ROOT / "datasets" / "pusht"
    if not (root / "meta" / "info.json").is_file():
        pytest.fail(f"sample dataset not found at {root}; run `python -m flywheel.pusht.sample --out {root}`")
    return root


@pytest.fixture(scope="session")
def rotated_root() -> Path:
    """The embedded default domain's dataset (datasets/pusht_rotated), with its simulator record."""
    root = DATASETS / "pusht_rotated"
    if not (root / "meta" / "pusht_sample.json").is_file():
        pytest.fail(f"{root} is missing; see datasets/README.md")
    return root
