"""benchmarks/iteration_gpu.py --dry-run: the GPU iteration benchmark's whole path (launch(), Pipes workloads as
subprocesses, the per-stage figures, the extrapolation) on CPU with the tiny preset. About 5 minutes on a loaded
2-core machine, so it is a slow test; the GPU numbers themselves are committed results, never timed tests."""

import json
import subprocess
import sys

import pytest

from flywheel.config import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def test_the_iteration_benchmark_measures_every_stage_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/iteration_gpu.py", "--dry-run", "--out", str(tmp_path),
                           "--work", str(tmp_path / "run"), "--strict-adapter-gate"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "iteration-gpu-cpu-dry-run.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["demonstrations", "training_clips", "adapter", "adapter_evaluation", "synthetic_videos",
                            "pseudo_actions", "curated_trajectories", "refreshed_dataset", "policy_evaluation"]
    assert len(report["run_ids"]) == 2, "a refused adapter: the stages after it ran in a second run"
    pipes = [name for name, f in stages.items() if f.get("pipes")]
    assert pipes == ["training_clips", "adapter", "adapter_evaluation", "synthetic_videos", "curated_trajectories",
                     "policy_evaluation"]
    for name in pipes:
        f = stages[name]
        # policy_evaluation loads no world model (and on a CPU evaluates nothing unless opted in)
        assert f["process_startup_s"] > 0 and (f["model_loads"] or name == "policy_evaluation"), (name, f)
        assert 0 < f["work_s"] < f["wall_s"], (name, f)
        assert 0 < f["before_workload_s"] < f["wall_s"] and 0 < f["after_workload_s"] < f["wall_s"], (name, f)
    assert stages["adapter"]["model_loads"][0]["parts"] == "transformer"
    assert stages["adapter"]["training_mode"] == "none" and stages["adapter"]["step_s_median"] > 0
    assert 0 < report["overhead"]["fixed_share_of_iteration"] < 1
    totals = report["extrapolation"]["totals"]
    assert totals["1_gpu"]["iteration_s"] > totals["2_gpu"]["iteration_s"] > totals["8_gpu"]["iteration_s"]
    assert (tmp_path / "iteration-gpu-cpu-dry-run.md").read_text().startswith("# One flywheel iteration")
