"""Cut training clips and cache their VAE latents and text embeddings (GPU: VAE + text encoder).

    python -m flywheel.workloads.clips --home H --config-json '{"manifest": "...", "clips": {...}, "model": {...}}'
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import ModelConfig
    from flywheel.data.clips import ClipConfig
    from flywheel.stages import clips_stage

    return clips_stage(home, args["manifest"], ClipConfig.model_validate(args.get("clips", {})),
                       ModelConfig.model_validate(args.get("model", {})), progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("clips", run))
