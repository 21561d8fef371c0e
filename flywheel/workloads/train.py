"""Train a LoRA/DoRA adapter on a latent cache (GPU).

    python -m flywheel.workloads.train --home H --config-json '{"latent_cache": "...", "train": {...}, "model": {...}}'

Resumes from the run's last checkpoint when restarted (a retried Dagster step continues, not restarts).
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import ModelConfig
    from flywheel.stages import train_stage
    from flywheel.train.config import TrainConfig

    return train_stage(home, args["latent_cache"], TrainConfig.model_validate(args.get("train", {})),
                       ModelConfig.model_validate(args.get("model", {})), progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("train", run))
