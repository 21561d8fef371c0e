"""The GPU benchmark scripts run end to end on CPU with the tiny preset (their GPU numbers are committed
results, never timed tests): so a change to the pipeline cannot silently break them."""

import json
import subprocess
import sys

from flywheel.cli import REPO_ROOT


def run(args: list[str], tmp_path) -> None:
    done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_multi_gpu_benchmark_dry_run_measures_both_workloads_on_two_gloo_processes(tmp_path):
    run(["benchmarks/multi_gpu.py", "--dry-run", "--out", str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "cpu-x2-tiny.json").read_text())
    for name in ("train_lora[x2]", "generate_i2w[x2]"):
        w = report["workloads"][name]
        assert w["baseline_s"] > 0 and w["ours_s"] > 0 and 0 < w["scaling_efficiency"] < 2, (name, w)
    assert (tmp_path / "cpu-x2-tiny.md").is_file()


def test_single_gpu_benchmark_measures_the_latent_cache_on_cpu(tmp_path):
    run(["benchmarks/cosmos_predict25.py", "--preset", "tiny", "--device", "cpu", "--quick", "--no-compile",
         "--only", "precompute_clip", "--out", str(tmp_path)], tmp_path)
    report = json.loads((tmp_path / "cpu-tiny.json").read_text())
    w = report["workloads"]["precompute_clip"]
    assert w["ours_s"] > 0 and w["clips_per_minute"] > 0 and w["vae_s"] > 0 and w["text_s"] > 0
