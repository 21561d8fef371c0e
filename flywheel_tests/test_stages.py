"""Stage runners: a clip set encoded before is reused without loading the model (minutes for the 2B one)."""

import pytest
import torch

import flywheel.stages as stages
from flywheel_tests.conftest import REPO_ROOT
from flywheel.config import ModelConfig
from flywheel.data.clips import ClipConfig
from flywheel.data.ingest import IngestConfig


def test_clips_stage_reuses_the_latent_cache_without_building_the_model(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    home = tmp_path / "home"
    demos = stages.ingest_stage(home, IngestConfig(source=str(REPO_ROOT / "datasets" / "pusht_rotated")))
    clip_config, model = ClipConfig(max_clips_per_episode=1), ModelConfig(preset="tiny")
    first = stages.clips_stage(home, demos.path, clip_config, model)
    assert first.metadata["cache_num_clips"] == 10

    def no_model(_model):
        raise AssertionError("the model was built although its latent cache exists")

    monkeypatch.setattr(stages, "_pipeline", no_model)
    again = stages.clips_stage(home, demos.path, clip_config, model)
    assert again.metadata["latent_cache_key"] == first.metadata["latent_cache_key"]
    assert again.metadata["latent_cache"] == first.metadata["latent_cache"]
    # another model is another cache: it has to be built
    with pytest.raises(AssertionError, match="latent cache exists"):
        stages.clips_stage(home, demos.path, clip_config, ModelConfig(preset="tiny", seed=1))
