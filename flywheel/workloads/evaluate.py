"""Compare an adapter with the base model on held-out clips (GPU: generation on both).

    python -m flywheel.workloads.evaluate --home H --config-json '{"adapter": "...", "clip_set": "...", "evaluate": {...}, "model": {...}}'
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import EvaluateConfig, ModelConfig
    from flywheel.stages import evaluate_stage

    return evaluate_stage(home, args["adapter"], args["clip_set"], EvaluateConfig.model_validate(args.get("evaluate", {})),
                          ModelConfig.model_validate(args.get("model", {})), progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("evaluate", run))
