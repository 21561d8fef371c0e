"""Adapter training: LoRA / DoRA on the frozen Cosmos Predict 2.5 transformer, from a latent cache.

The training loop is `flywheel.train.lora`, the config `flywheel.train.config`. Names are resolved on
first use so that reading a config does not import torch.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "flywheel.train.config",
    "TrainResult": "flywheel.train.lora",
    "flow_matching_loss": "flywheel.train.lora",
    "sample_flow_draw": "flywheel.train.lora",
    "train_adapter": "flywheel.train.lora",
    "training_step": "flywheel.train.lora",
    "load_adapter": "flywheel.train.adapter_io",
    "read_card": "flywheel.train.adapter_io",
    "remove_adapter": "flywheel.train.adapter_io",
    "save_adapter": "flywheel.train.adapter_io",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.train' has no attribute {name!r}")
