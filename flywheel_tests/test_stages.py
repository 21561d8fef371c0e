"""Stage runners: a clip set encoded before is reused without loading the model (minutes for the 2B one); the
domain's IDM trains through the model's codec where that codec renders the domain."""

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


def test_idm_stage_trains_through_the_models_codec_where_it_renders_the_domain(tmp_path):
    """tiny-pusht's VAE renders PushT: the IDM trains on the episodes as recorded and as it renders them, and
    reports its error on held-out episodes through the codec; the random tiny preset's VAE renders nothing, so
    its IDM trains on the real frames (and says why); without a model there is no codec to train through."""
    from flywheel.label.config import IdmConfig

    torch.set_num_threads(1)
    home = tmp_path / "home"
    demos = stages.ingest_stage(home, IngestConfig(source=str(REPO_ROOT / "datasets" / "pusht_rotated")))
    config = IdmConfig(steps=5, batch_size=8, width=8, image_size=32)
    # Generated clips of 17 frames at 8 fps: half the codec's work of the preset's 16 fps, the same path.
    through = stages.idm_stage(home, demos.path, config, model=ModelConfig(preset="tiny-pusht"),
                               clip_config=ClipConfig(fps=8))
    assert through.metadata["codec_augment"] is True and through.metadata["mae_mean_through_codec"] > 0
    refused = stages.idm_stage(home, demos.path, config, model=ModelConfig(preset="tiny"))
    assert refused.metadata["codec_augment"] is False and "mae_mean_through_codec" not in refused.metadata
    assert "cannot render this domain" in refused.metadata["codec_augment_reason"]
    plain = stages.idm_stage(home, demos.path, config)
    assert plain.metadata["codec_augment"] is False
    assert len({through.key, refused.key, plain.key}) == 3  # three different IDMs, three artifacts
