"""Action labelling: an inverse-dynamics model trained on real demonstrations labels generated videos.

Names are resolved on first use so that reading a config (flywheel.label.config) does not import torch.
"""

import importlib

_EXPORTS = {
    "IdmConfig": "flywheel.label.config",
    "LabelConfig": "flywheel.label.config",
    "Episode": "flywheel.label.episodes",
    "list_episodes": "flywheel.label.episodes",
    "load_actions": "flywheel.label.episodes",
    "load_episodes": "flywheel.label.episodes",
    "resize_frames": "flywheel.label.episodes",
    "IdmResult": "flywheel.label.idm",
    "InverseDynamicsModel": "flywheel.label.idm",
    "fit_idm": "flywheel.label.idm",
    "train_idm": "flywheel.label.idm",
    "label_video": "flywheel.label.labeling",
    "nearest_indices": "flywheel.label.labeling",
    "resample_actions": "flywheel.label.labeling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flywheel.label' has no attribute {name!r}")
