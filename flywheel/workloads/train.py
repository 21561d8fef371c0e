"""Train a LoRA/DoRA adapter on a latent cache (GPU).

    python -m flywheel.workloads.train --home H --config-json '{"latent_cache": "...", "train": {...}, "model": {...}}'

Resumes from the run's last checkpoint when restarted (a retried Dagster step continues, not restarts).
On several GPUs (`torchrun --standalone --nproc-per-node N -m flywheel.workloads.train ...`) it trains
data-parallel: train.batch_size is the global batch (a multiple of N), the result is the same adapter.
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import ModelConfig
    from flywheel.stages import train_stage
    from flywheel.train.config import TrainConfig
    from flywheel.train.distributed import current_world

    config = TrainConfig.model_validate(args.get("train", {}))
    current_world().shard(config.batch_size)  # several GPUs: the global batch must split evenly; fail before loading
    return train_stage(home, args["latent_cache"], config, ModelConfig.model_validate(args.get("model", {})), progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("train", run))
