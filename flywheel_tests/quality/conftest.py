"""Decoded real episodes are cached once per test session (every test package points at the same folder),
so the real videos are decoded once however many tests read them."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def episode_cache(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "flywheel_episode_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def pusht_root() -> Path:
    root = REPO_ROOT / "datasets" / "pusht"
    if not (root / "meta" / "info.json").is_file():
        pytest.fail(f"sample dataset not found at {root}; run `python -m flywheel.data.pusht_sample --out {root}`")
    return root
