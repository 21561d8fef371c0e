"""Run one flywheel stage as a process: `python -m flywheel.workloads.stage --stage <asset> --home H --config-json J`.

J = {"inputs": {<upstream asset>: <its materialization metadata>, ...}, "config": <FlywheelConfig as JSON>}.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(stage_name: str, home: Path, args: dict, progress):
    from flywheel.config import FlywheelConfig
    from flywheel.pipeline import STAGES
    from flywheel.stages import StageResult

    stage = STAGES[stage_name]
    config = FlywheelConfig.model_validate(args["config"])
    inputs = {name: StageResult.from_metadata(meta) for name, meta in (args.get("inputs") or {}).items()}
    return stage.run(home, inputs, config, progress)


if __name__ == "__main__":
    from flywheel.workloads.entrypoint import main

    sys.exit(main(run))
