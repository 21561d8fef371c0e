"""Model/data fit: how well each toy preset's VAE reconstructs each embedded dataset's real clips.

For every (preset, dataset, resize) case: ingest the dataset (flywheel.data.ingest, into a temporary
home), take the first clip of up to --clips episodes spread over it, made exactly as the clips stage makes
them (the preset's 64x64, 17 frames at 16 fps), and round-trip them through the preset's VAE
(flywheel.model.fit.manifest_fit -> codec_roundtrips). PSNR over the clip and the mean per-frame SSIM
(flywheel.quality.stats) inside the picture (padding bars excluded). Then the proposed floors
(flywheel.model.fit.DEFAULT_MIN_PSNR_DB / DEFAULT_MIN_SSIM) against those numbers: tiny-pusht on PushT
should pass, tiny-pusht on the real G1 camera and the random-weight `tiny` should not. The real model's
VAE (Wan2.1, `cosmos-predict2.5-2b`) needs a download and is not measured here.

Seconds on a CPU; writes <out>/model-fit.json and <out>/model-fit.md.

    python benchmarks/model_fit.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = [  # (preset, dataset folder under datasets/, clips.resize)
    ("tiny-pusht", "pusht", "pad"),
    ("tiny-pusht", "pusht_rotated", "pad"),
    ("tiny-pusht", "g1_pick_bottle", "pad"),
    ("tiny-pusht", "g1_pick_bottle", "stretch"),
    ("tiny", "pusht_rotated", "pad"),
    ("tiny", "g1_pick_bottle", "pad"),
]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def software() -> dict:
    import diffusers
    import lerobot

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "lerobot": lerobot.__version__,
            "python": sys.version.split()[0], "flywheel_commit": commit.strip() or None}


def measure(cases, clips: int) -> list[dict]:
    from flywheel.data.clips import ClipConfig
    from flywheel.data.ingest import IngestConfig, ingest
    from flywheel.model.fit import DEFAULT_MIN_PSNR_DB, DEFAULT_MIN_SSIM, manifest_fit
    from flywheel.model.presets import load_pipeline
    from flywheel.store import ArtifactStore

    rows, pipes, manifests = [], {}, {}
    with tempfile.TemporaryDirectory() as home:
        store = ArtifactStore(Path(home))
        for preset, dataset, resize in cases:
            if preset not in pipes:
                pipes[preset] = load_pipeline(preset, device="cpu")
            if dataset not in manifests:
                manifests[dataset] = ingest(IngestConfig(source=str(REPO / "datasets" / dataset)), store).frame
            started = time.perf_counter()
            fit = manifest_fit(pipes[preset], manifests[dataset], ClipConfig(resize=resize), max_clips=clips,
                               source=f"datasets/{dataset}")
            seconds = time.perf_counter() - started
            passes = fit.psnr_db >= DEFAULT_MIN_PSNR_DB and fit.ssim >= DEFAULT_MIN_SSIM
            rows.append(dict(preset=preset, dataset=dataset, resize=resize, psnr_db=round(fit.psnr_db, 2),
                             ssim=round(fit.ssim, 3), psnr_db_min=round(fit.psnr_db_min, 2),
                             ssim_min=round(fit.ssim_min, 3), clips=[dict(clip_id=c.clip_id, psnr_db=round(c.psnr_db, 2),
                                                                          ssim=round(c.ssim, 3)) for c in fit.clips],
                             passes_proposed_floors=passes, seconds=round(seconds, 2), vae_seconds=fit.seconds))
            print(f"{preset:11s} {dataset:15s} {resize:8s} {fit.psnr_db:6.2f} dB  SSIM {fit.ssim:.3f}  "
                  f"{'passes' if passes else 'fails'}  ({seconds:.1f} s)", flush=True)
    return rows


def write_markdown(report: dict, path: Path) -> None:
    floors = report["proposed_floors"]
    machine = report["machine"]
    lines = [f"# Model/data fit: VAE round-trip of real clips ({report['date']}, {machine['cpu']}, "
             f"{machine['cores']} cores)", "",
             f"`python benchmarks/model_fit.py` — {report['clips_per_case']} clips per case (first clip of episodes "
             "spread over the dataset, 17 frames at 16 fps, 64x64), PSNR over the clip and mean per-frame SSIM "
             "inside the picture. Proposed floors: "
             f"**{floors['min_psnr_db']} dB PSNR and {floors['min_ssim']} SSIM**.", "",
             "| preset | dataset | resize | PSNR dB (mean / min) | SSIM (mean / min) | floors | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['preset']} | {r['dataset']} | {r['resize']} | {r['psnr_db']:.2f} / {r['psnr_db_min']:.2f} | "
                     f"{r['ssim']:.3f} / {r['ssim_min']:.3f} | {'pass' if r['passes_proposed_floors'] else 'fail'} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", report["conclusion"], "", f"Software: {json.dumps(report['software'])}", ""]
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    from flywheel.model.fit import DEFAULT_MIN_PSNR_DB, DEFAULT_MIN_SSIM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--clips", type=int, default=4, help="clips per case")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = measure(CASES, args.clips)
    fits = {(r["preset"], r["dataset"], r["resize"]): r for r in results}
    pusht_worst = min(r["psnr_db_min"] for (p, d, _), r in fits.items() if p == "tiny-pusht" and d.startswith("pusht"))
    others_best = max(r["psnr_db"] for (p, d, _), r in fits.items() if p == "tiny" or d.startswith("g1"))
    separated = all(r["passes_proposed_floors"] == (r["preset"] == "tiny-pusht" and r["dataset"].startswith("pusht"))
                    for r in results)
    conclusion = (f"The floors {'separate' if separated else 'do NOT separate'} the cases: tiny-pusht on PushT "
                  f"(worst clip {pusht_worst:.1f} dB) passes; tiny-pusht on the real G1 camera and the random-weight "
                  f"`tiny` (best mean {others_best:.1f} dB) fail. Wan2.1's VAE on real robot video (the "
                  "cosmos-predict2.5-2b preset) is not measured here (download, GPU).")
    report = dict(benchmark="model_fit", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                               system=platform.platform()),
                  software=software(), clips_per_case=args.clips,
                  proposed_floors=dict(min_psnr_db=DEFAULT_MIN_PSNR_DB, min_ssim=DEFAULT_MIN_SSIM),
                  floors_separate_cases=separated, conclusion=conclusion, results=results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model-fit.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "model-fit.md")
    print(conclusion)
    return report


if __name__ == "__main__":
    main()
