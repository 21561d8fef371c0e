"""Generate synthetic videos from clip first frames, with an adapter or the base model (GPU).

    python -m flywheel.workloads.generate --home H --config-json '{"adapter": "..." | null, "clip_set": "...", "generate": {...}, "model": {...}}'

On several GPUs (`torchrun --standalone --nproc-per-node N -m flywheel.workloads.generate ...`) the videos are
split over the ranks and gathered into one artifact by rank 0; each video is the same as on one GPU.
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import ModelConfig
    from flywheel.generate.config import GenerateConfig
    from flywheel.stages import generate_stage

    return generate_stage(home, args.get("adapter"), args["clip_set"], GenerateConfig.model_validate(args.get("generate", {})),
                          ModelConfig.model_validate(args.get("model", {})), progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("generate", run))
