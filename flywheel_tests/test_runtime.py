"""Threads per process: OMP_NUM_THREADS when set, else the cores the process may actually use."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flywheel.runtime import cgroup_cpu_limit

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys
if sys.argv[1] != "all":
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
import torch
from flywheel.runtime import configure_threads
chosen = configure_threads(sys.argv[2]) if len(sys.argv) > 2 else configure_threads()
assert chosen["torch_threads"] == torch.get_num_threads()
print(json.dumps(chosen))
"""


def probe(cpus: str, env: dict, *args: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    environ.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE, cpus, *args], env=environ, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_threads_follow_the_cores_the_process_may_use():
    cores = sorted(os.sched_getaffinity(0))
    one = probe(str(cores[0]), {})
    assert (one["torch_threads"], one["threads_source"], one["affinity_cores"]) == (1, "available cores", 1)
    if len(cores) >= 2:
        both = probe(",".join(map(str, cores[:2])), {})
        assert both["torch_threads"] == 2 and both["affinity_cores"] == 2
        shared = probe(",".join(map(str, cores[:2])), {"LOCAL_WORLD_SIZE": "2"})  # two torchrun ranks on the host
        assert shared["torch_threads"] == 1 and shared["local_processes"] == 2


def test_omp_num_threads_is_respected():
    chosen = probe("all", {"OMP_NUM_THREADS": "3"})
    assert (chosen["torch_threads"], chosen["threads_source"]) == (3, "OMP_NUM_THREADS")
    ignored = probe("all", {"OMP_NUM_THREADS": "lots"})  # not a number: the cores decide
    assert ignored["threads_source"] == "available cores"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_a_quota_caps_the_threads(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # one core's worth, whatever the affinity
    chosen = probe("all", {}, str(tmp_path))
    assert (chosen["torch_threads"], chosen["cgroup_cpu_quota"]) == (1, 1.0)
