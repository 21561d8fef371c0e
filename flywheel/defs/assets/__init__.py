"""The flywheel as assets, one group per stage, every asset partitioned by domain:

    demonstrations -> training_clips -> adapter -> adapter_evaluation -> synthetic_videos
      -> pseudo_actions -> curated_trajectories -> refreshed_dataset
"""

from flywheel.defs.assets.clips import training_clips
from flywheel.defs.assets.curate import curated_trajectories
from flywheel.defs.assets.evaluate import adapter_evaluation
from flywheel.defs.assets.generate import synthetic_videos
from flywheel.defs.assets.ingest import demonstrations
from flywheel.defs.assets.label import pseudo_actions
from flywheel.defs.assets.refresh import refreshed_dataset
from flywheel.defs.assets.train import adapter

FLYWHEEL_ASSETS = [
    demonstrations,
    training_clips,
    adapter,
    adapter_evaluation,
    synthetic_videos,
    pseudo_actions,
    curated_trajectories,
    refreshed_dataset,
]
