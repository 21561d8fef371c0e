"""How long the default main job's curation stage takes, and what it accepts, on the inputs of a finished run.

    .venv/bin/python -m flywheel.cli iterate --home /tmp/h           # once: a default main job
    .venv/bin/python benchmarks/curation_timing.py --home /tmp/h [--repeat 3] [--label new] [--out FILE.json]

Runs `flywheel.stages.curate_stage` on that run's pseudo_actions and demonstrations with the default
config, each time into a fresh flywheel home (nothing reused), and reports the wall-clock seconds and the
accepted count. Point PYTHONPATH at another checkout (e.g. `git archive <commit> | tar -x -C /tmp/old`) to
time that code on the same inputs and machine; interleave the runs when the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True, help="flywheel home of a finished default main job")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--out", default=None, help="append the result (one JSON object per line) to this file")
    args = parser.parse_args(argv)

    import flywheel
    from flywheel import stages
    from flywheel.config import load_config

    home = Path(args.home)
    config = load_config(overrides={"home": str(home)})  # the defaults, as `flywheel iterate` runs them
    labels = sorted((home / "labels").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    manifest = sorted((home / "manifests").iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as fresh:
            started = time.perf_counter()
            result = stages.curate_stage(fresh, labels, manifest, config.quality, model=config.model)
            seconds = time.perf_counter() - started
            runs.append({"seconds": round(seconds, 2), "accepted": result.metadata["accepted"],
                         "clips": result.metadata["clips"], "rejected_by": result.metadata.get("rejected_by")})
            print(json.dumps(runs[-1]), flush=True)
    report = {"label": args.label, "code": str(Path(flywheel.__file__).parent), "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": platform.platform(), "inputs": {"labels": str(labels), "manifest": str(manifest)},
              "runs": runs, "median_seconds": sorted(r["seconds"] for r in runs)[len(runs) // 2]}
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(report) + "\n")
    return report


if __name__ == "__main__":
    main()
