"""How long ingest's checks take on the embedded datasets: what decoding every frame costs over demuxing only.

    python benchmarks/ingest_checks.py --out benchmarks/results            # this checkout's flywheel
    PYTHONPATH=/path/to/older/checkout python benchmarks/ingest_checks.py --label before --out ...

Per dataset and decode mode: the median wall time of `ingest()` into a fresh home (`--reps` times; the
first rep of the process, which pays imports, is not counted), and the strict full decode's throughput on
the G1 sample's first video file (frames per second, `flywheel.data.video.scan_video`). Results are merged
into `<out>/ingest-checks-cpu.json` under the label, with the machine, versions, date and load average (on
a machine shared with other jobs the load says how far the seconds can be trusted) and rendered as a table
in `<out>/ingest-checks-cpu.md`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("pusht_rotated", "g1_pick_bottle")


def time_ingest(source: Path, decode: str | None, reps: int) -> list[float]:
    from flywheel.data.ingest import IngestConfig, ingest
    from flywheel.store import ArtifactStore

    fields = {"source": str(source)}
    if decode is not None:
        fields["decode"] = decode
    times = []
    for _ in range(reps + 1):
        with tempfile.TemporaryDirectory() as home:
            started = time.perf_counter()
            ingest(IngestConfig(**fields), ArtifactStore(home), progress=lambda event: None)
            times.append(time.perf_counter() - started)
    return times[1:]


def decode_throughput(path: Path) -> dict:
    from flywheel.data.video import scan_video

    started = time.perf_counter()
    scan = scan_video(path, decode=True)
    seconds = time.perf_counter() - started
    return {"file": str(path.relative_to(REPO)), "frames": len(scan.packets), "seconds": round(seconds, 3),
            "frames_per_s": round(len(scan.packets) / seconds), "codec": scan.codec,
            "size": f"{scan.height}x{scan.width}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--label", default="after")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import flywheel.data.ingest as ingest_module

    modes = [None]
    if "decode" in ingest_module.IngestConfig.model_fields:
        modes = ["all", "sample"]
    workloads = {}
    for name in DATASETS:
        for mode in modes:
            times = time_ingest(REPO / "datasets" / name, mode, args.reps)
            workloads[f"{name}[decode={mode or 'demux only'}]"] = {
                "median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}
    result = {
        "label": args.label, "code": str(Path(ingest_module.__file__).resolve().parents[2]),
        "date": datetime.date.today().isoformat(), "machine": platform.node(), "cpu": platform.processor(),
        "cores": len(os.sched_getaffinity(0)), "load_average": [round(x, 2) for x in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
        "av": importlib.metadata.version("av"), "pandas": importlib.metadata.version("pandas"),
        "workloads": workloads,
    }
    if "decode" in ingest_module.IngestConfig.model_fields:
        result["decode_throughput"] = decode_throughput(
            REPO / "datasets/g1_pick_bottle/videos/observation.images.cam_high/chunk-000/file-000.mp4")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ingest-checks-cpu.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[args.label] = result
    path.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    lines = ["# Ingest checks on the embedded datasets (CPU)", "",
             "Made by `benchmarks/ingest_checks.py`; median of the timed reps, fresh home each. `before`: "
             "demuxing only (no frame decoded but each file's first and last); `after`: every check of "
             "flywheel.data.ingest.", "",
             "| label | workload | median s | runs s | load average | date |", "|---|---|---|---|---|---|"]
    for label, run in merged.items():
        for workload, numbers in run["workloads"].items():
            lines.append(f"| {label} | {workload} | {numbers['median_s']} | {numbers['runs_s']} | "
                         f"{run['load_average']} on {run['cores']} cores | {run['date']} |")
    for label, run in merged.items():
        if "decode_throughput" in run:
            d = run["decode_throughput"]
            lines += ["", f"Strict full decode ({label}): {d['frames']} frames of {d['size']} {d['codec']} in "
                      f"{d['seconds']} s = {d['frames_per_s']} frames/s ({d['file']})."]
    (args.out / "ingest-checks-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
