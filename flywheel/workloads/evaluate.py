"""Compare an adapter with the base model on held-out clips (GPU: generation on both).

    python -m flywheel.workloads.evaluate --home H --config-json '{"adapter": "...", "clip_set": "...", "evaluate": {...}, "generate": {...}, "model": {...}}'

`generate` (optional) holds the sampler settings of the base and adapter generations; `quality` (optional)
the filter config whose video filters score both sides (their pass rates go into the metrics).
"""

import sys
from pathlib import Path


def run(home: Path, args: dict, progress):
    from flywheel.config import EvaluateConfig, ModelConfig
    from flywheel.generate.config import GenerateConfig
    from flywheel.quality.config import FilterConfig
    from flywheel.stages import evaluate_stage

    generate = GenerateConfig.model_validate(args["generate"]) if args.get("generate") is not None else None
    quality = FilterConfig.model_validate(args["quality"]) if args.get("quality") is not None else None
    return evaluate_stage(home, args["adapter"], args["clip_set"], EvaluateConfig.model_validate(args.get("evaluate", {})),
                          ModelConfig.model_validate(args.get("model", {})), progress, generate_config=generate,
                          filter_config=quality)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main("evaluate", run))
