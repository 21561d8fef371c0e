"""Action labelling: an inverse-dynamics model trained on real demonstrations labels generated videos."""

from flywheel.label.config import IdmConfig, LabelConfig
from flywheel.label.episodes import Episode, list_episodes, load_actions, load_episodes, resize_frames
from flywheel.label.idm import IdmResult, InverseDynamicsModel, fit_idm, train_idm
from flywheel.label.labeling import label_video, nearest_indices, resample_actions

__all__ = ["IdmConfig", "LabelConfig", "Episode", "list_episodes", "load_actions", "load_episodes", "resize_frames", "IdmResult",
           "InverseDynamicsModel", "fit_idm", "train_idm", "label_video", "nearest_indices", "resample_actions"]
