"""benchmarks/policy_usefulness.py end to end on a toy budget: the committed refreshed version against the real
one, the (arm, seed) runs in two worker processes (the GPU profile's path), merged as one process would have
made them; its JSON and Markdown. Slow (about a minute on the shared CPU)."""

import json
import subprocess
import sys

import pytest

from flywheel_tests.conftest import REPO_ROOT
from flywheel_tests.policy.conftest import TINY_ACT


@pytest.mark.slow
def test_policy_benchmark_runs_arms_in_parallel_and_writes_its_report(tmp_path):
    cmd = [sys.executable, "benchmarks/policy_usefulness.py", "--refreshed", "datasets/pusht_rotated_refreshed64",
           "--steps", "2", "--batch-size", "4", "--episodes", "3", "--max-steps", "8", "--rollout-batch", "3",
           "--seeds", "0,1", "--jobs", "2", "--policy-override", json.dumps(TINY_ACT), "--out", str(tmp_path),
           "--name", "tiny"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "tiny.json").read_text())
    (comparison,) = result["comparisons"]
    report = comparison["report"]
    runs = sorted((r["arm"], r["seed"]) for r in report["runs"])
    assert runs == [("real", 0), ("real", 1), ("refreshed", 0), ("refreshed", 1)]
    assert report["datasets"]["refreshed"]["synthetic_episodes"] == 21 and report["episodes_per_seed"] == 3
    assert comparison["synthetic"]["synthetic_episodes"] == 21
    assert {r["train"]["steps"] for r in report["runs"]} == {2}
    assert "| v1 | refreshed | 31 (21) |" in (tmp_path / "tiny.md").read_text()
