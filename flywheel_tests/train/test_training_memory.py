"""What the training device holds while the adapter trains (the transformer, its adapter and optimizer state:
not the text encoder, not the VAE), and which checkpointing mode the free GPU memory chooses (fake free-memory
numbers: the choice is a function of them)."""

from __future__ import annotations

import gc
import json
import warnings

import pytest
import torch

from flywheel.config import ModelConfig
from flywheel.model.presets import TransformerOnly, load_pipeline, model_loads
from flywheel.stages import train_stage
from flywheel.train import TrainConfig, train_adapter
from flywheel.train.config import RECIPE_TOKENS, choose_training_mode
from flywheel.train.lora import _changed_fields
from flywheel_tests.train import tiny_latent_cache  # noqa: F401  (session fixture)

GIB = 2**30
SHORT = dict(rank=4, alpha=4, steps=3, checkpoint_every=1000)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _live_modules() -> list[torch.nn.Module]:
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated module-level proxies warns
        warnings.simplefilter("ignore", FutureWarning)
        return [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]


class ResidentAtFirstStep:
    """At the first training forward of a Cosmos transformer, every module created since `__enter__` that holds
    parameters, other than that transformer's own modules: what else the run loaded and kept alive."""

    def __enter__(self):
        gc.collect()
        self.before = {id(o) for o in _live_modules()}
        self.others: list[str] | None = None
        self.transformer_device: set[str] = set()
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def _hook(self, module, args):
        if self.others is not None or type(module).__name__ != "CosmosTransformer3DModel" or not module.training:
            return
        own = {id(m) for m in module.modules()}
        others = [o for o in _live_modules() if id(o) not in self.before and id(o) not in own
                  and any(p is not None for p in o._parameters.values())]
        self.others = sorted({type(o).__name__ for o in others})
        self.other_parameters = {id(p) for o in others for p in o._parameters.values() if p is not None}
        self.transformer_device = {str(p.device) for p in module.parameters()}

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def test_the_train_stage_holds_only_the_transformer_while_training_and_records_the_mode(tiny_latent_cache, tmp_path):
    cache = tiny_latent_cache
    with ResidentAtFirstStep() as probe:
        result = train_stage(tmp_path / "home", cache.root, TrainConfig(**SHORT), ModelConfig(preset="tiny", device="cpu"))
    assert probe.others == [], f"besides the transformer, training kept {probe.others} alive"
    assert probe.transformer_device == {"cpu"}
    assert model_loads()[-1]["parts"] == "transformer"

    card = json.loads((result.path / "adapter_card.json").read_text())
    assert card["training_mode"] == {"activation_checkpointing": "none", "selective_save": None,
                                     "chosen_by": "default on cpu", "estimated_step_gib": None, "fits": None}
    assert card["config"]["activation_checkpointing"] == "none"
    assert result.metadata["training_mode"] == "none" and result.metadata["training_mode_chosen_by"] == "default on cpu"
    assert result.metadata["first_step_s"] > 0 and result.metadata["step_s_median"] > 0


def test_the_probe_sees_a_whole_pipeline_kept_during_training(tiny_latent_cache, tmp_path):
    """The check above can fail: training on a whole pipeline keeps its text encoder and VAE alive."""
    with ResidentAtFirstStep() as probe:
        pipe = load_pipeline("tiny")
        train_adapter(tiny_latent_cache, pipe, TrainConfig(**SHORT), tmp_path / "run")
    text_encoder_and_vae = {id(p) for module in (pipe.text_encoder, pipe.vae) for p in module.parameters()}
    assert probe.other_parameters == text_encoder_and_vae


def test_the_transformer_alone_has_the_whole_pipelines_weights(tiny_pipe):
    alone = load_pipeline("tiny", transformer_only=True)
    assert isinstance(alone, TransformerOnly) and alone.text_encoder is None and alone.vae is None
    assert alone.flywheel_preset == tiny_pipe.flywheel_preset
    ours, whole = alone.transformer.state_dict(), tiny_pipe.transformer.state_dict()
    assert ours.keys() == whole.keys() and all(torch.equal(ours[k], whole[k]) for k in ours)
    pretrained = load_pipeline("tiny-pusht", transformer_only=True)
    assert pretrained.flywheel_preset.revision == load_pipeline("tiny-pusht").flywheel_preset.revision
    codec = load_pipeline("tiny", vae_only=True)  # a random preset's codec: no DiT, no text encoder built
    assert codec.transformer is None and codec.text_encoder is None
    ours, whole = codec.vae.state_dict(), tiny_pipe.vae.state_dict()
    assert ours.keys() == whole.keys() and all(torch.equal(ours[k], whole[k]) for k in ours)
    with pytest.raises(ValueError, match="vae_only or transformer_only"):
        load_pipeline("tiny", vae_only=True, transformer_only=True)


@pytest.mark.parametrize("free_gib, expected", [
    (74.0, ("selective", "attention_matmul")),  # an 80 GB H100 with the 2B transformer loaded
    (40.0, ("selective", "attention")),         # a 48 GB card
    (18.0, ("full", None)),                     # a 24 GB card
])
def test_the_fastest_mode_that_fits_the_free_memory_at_the_recipe_shape(free_gib, expected):
    config = TrainConfig()
    choice = choose_training_mode(config, int(free_gib * GIB), RECIPE_TOKENS)
    assert choice.mode == expected and choice.fits and choice.chosen_by == "free GPU memory"
    resolved = config.on_device("cuda", int(free_gib * GIB), RECIPE_TOKENS)
    assert (resolved.activation_checkpointing, resolved.selective_save) == expected and resolved.compile is True
    assert config.training_mode("cuda", int(free_gib * GIB), RECIPE_TOKENS) == choice


def test_the_estimate_scales_with_the_clip_and_the_batch():
    # 53.23 GiB peak at 31,104 tokens: 49.39 GiB above the 3.84 GiB of weights
    assert choose_training_mode(TrainConfig(), 74 * GIB, RECIPE_TOKENS).estimated_step_gib == pytest.approx(49.39)
    # half the frames fit the fast mode on a 48 GB card; two clips per GPU no longer fit it on an 80 GB one
    assert choose_training_mode(TrainConfig(), 40 * GIB, RECIPE_TOKENS // 2).mode == ("selective", "attention_matmul")
    assert choose_training_mode(TrainConfig(batch_size=2), 74 * GIB, 2 * RECIPE_TOKENS).mode == ("selective", "attention")


def test_nothing_fits_the_least_memory_runs_and_a_set_mode_is_kept():
    least = choose_training_mode(TrainConfig(), 8 * GIB, RECIPE_TOKENS)
    assert least.mode == ("full", None) and least.fits is False
    # DoRA: its measured full-checkpointing peak (eager, fp32 products) is above attention-only
    assert choose_training_mode(TrainConfig(method="dora"), 18 * GIB, RECIPE_TOKENS).mode == ("selective", "attention")
    # what the config sets is what runs
    fixed = choose_training_mode(TrainConfig(activation_checkpointing="none"), 8 * GIB, RECIPE_TOKENS)
    assert fixed.mode == ("none", None) and fixed.chosen_by == "config"
    assert choose_training_mode(TrainConfig(gradient_checkpointing=True), 80 * GIB, RECIPE_TOKENS).mode == ("full", None)
    # selective without a save: only the selective modes are open
    assert choose_training_mode(TrainConfig(activation_checkpointing="selective"), 8 * GIB,
                                RECIPE_TOKENS).mode == ("selective", "attention")
    # a save without a mode: that save, or full checkpointing
    assert choose_training_mode(TrainConfig(selective_save="attention_matmul"), 40 * GIB,
                                RECIPE_TOKENS).mode == ("full", None)
    # no reading of the memory (a caller that has none): the fast path, as before; a CPU: eager
    gpu = TrainConfig().on_device("cuda")
    assert (gpu.activation_checkpointing, gpu.selective_save) == ("selective", "attention_matmul")
    assert TrainConfig().on_device("cpu", 8 * GIB, RECIPE_TOKENS).activation_checkpointing == "none"


def test_a_finished_adapter_is_reused_under_another_checkpointing_mode_but_not_another_rank(tiny_latent_cache,
                                                                                          tmp_path):
    tiny = load_pipeline("tiny", transformer_only=True)
    first = train_adapter(tiny_latent_cache, tiny, TrainConfig(**SHORT, activation_checkpointing="full"), tmp_path / "run")
    again = train_adapter(tiny_latent_cache, tiny, TrainConfig(**SHORT, activation_checkpointing="none"), tmp_path / "run")
    assert again.resumed_from_step == 3 and again.losses == first.losses  # reused, not retrained
    with pytest.raises(ValueError, match="another config"):
        train_adapter(tiny_latent_cache, tiny, TrainConfig(**{**SHORT, "rank": 8, "alpha": 8}), tmp_path / "run")
    assert _changed_fields({"rank": 4, "compile": True}, {"rank": 4, "compile": False}) == []
    assert _changed_fields({"rank": 4}, {"rank": 8}) == ["rank"]
