"""Adapter training: LoRA / DoRA on the frozen Cosmos Predict 2.5 transformer, from a latent cache."""

from flywheel.train.adapter_io import load_adapter, read_card, remove_adapter, save_adapter
from flywheel.train.config import TrainConfig
from flywheel.train.lora import TrainResult, flow_matching_loss, sample_flow_draw, train_adapter, training_step

__all__ = [
    "TrainConfig",
    "TrainResult",
    "flow_matching_loss",
    "load_adapter",
    "read_card",
    "remove_adapter",
    "sample_flow_draw",
    "save_adapter",
    "train_adapter",
    "training_step",
]
