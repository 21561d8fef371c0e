"""A flywheel home copied to another path keeps working on its own: the copy's store names the copy's files,
nothing is written into the original, and nothing writes `mlruns/` into the working directory."""

import json
import os
import shutil
from pathlib import Path

import pytest

from flywheel import decisions
from flywheel.cli import main as flywheel_main
from flywheel.lineage import registry, runs, tracking
from flywheel.lineage.recorder import IterationLineage, close_dagster_run
from flywheel.stages import StageResult
from flywheel.store import hash_tree
from flywheel_tests.lineage import clear_tracking_env, make_adapter

DOMAIN = "copied"
EVALUATION = {"psnr_adapter": 21.0, "psnr_base": 20.0, "ssim_adapter": 0.9, "ssim_base": 0.9}


def one_iteration(home: Path) -> dict:
    """One iteration logged with the calls the Dagster assets make: a trained adapter registered and promoted by
    the gate, a synthetic set generated with it, and the Dagster run's end."""
    lineage = IterationLineage.for_dagster_run(home, DOMAIN, "dg-copy")
    adapter = make_adapter(home / "adapters" / "k1", seed=5)
    with lineage.stage("adapter", "k1", {"rank": 4}) as run:
        version = lineage.register_adapter(run, StageResult(stage="adapter", key="k1", path=adapter), "t" * 64)
    with lineage.stage("adapter_evaluation", "e1", {"max_clips": 1}):
        decision = decisions.gate_and_promote(lineage, version, EVALUATION, decisions.AdapterGate(), "iteration 1")
    assert decision.passed
    synthetic = "5c" * 32
    with lineage.stage("synthetic_videos", "s1", {"seeds": [0]}) as run:
        runs.log_synthetic_set(run, DOMAIN, version, synthetic, str(home / "synthetic" / "s1"),
                               [{"episode_id": "e0", "prompt": "push the T", "seed": 0}])
    close_dagster_run(home, "dg-copy", "FINISHED")
    return {"version": version, "synthetic": synthetic, "adapter": adapter}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and modification time (what a write would change)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def in_empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    clear_tracking_env()
    return cwd


def test_a_copied_home_works_and_leaves_the_original_untouched(tmp_path, in_empty_cwd, capsys):
    original = tmp_path / "original" / "home"
    logged = one_iteration(original)
    copy = tmp_path / "elsewhere" / "home-copy"
    shutil.copytree(original, copy, symlinks=True)
    before = snapshot(original)

    # The flywheel's own readers, from the copy only: the CLI and adapter resolution.
    args = ["--home", str(copy), "--json"]
    assert flywheel_main(["adapters", "list", *args]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["domain"], r["version"], r["aliases"]) for r in listed] == [(DOMAIN, "1", ["candidate", "champion"])]
    assert flywheel_main(["adapters", "show", DOMAIN, *args]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tags"]["flywheel.adapter_path"] == "adapters/k1"  # relative to the home
    assert flywheel_main(["adapters", "lineage", DOMAIN, *args]) == 0
    products = json.loads(capsys.readouterr().out)["products"]
    assert [s["digest"] for s in products["synthetic_sets"]] == [logged["synthetic"]]
    version, path = registry.resolve_adapter(copy, DOMAIN)
    assert version == "1" and path.is_relative_to(copy.resolve()) and hash_tree(path) == hash_tree(logged["adapter"])
    assert IterationLineage(copy, DOMAIN).adapter_dir("1") == copy.resolve() / "adapters" / "k1"

    # ... and a writer: the next iteration in the copy writes its runs and adapter into the copy.
    nxt = IterationLineage.for_dagster_run(copy, DOMAIN, "dg-next")
    adapter2 = make_adapter(copy / "adapters" / "k2", seed=6)
    with nxt.stage("adapter", "k2", {"rank": 4}) as run:
        version2 = nxt.register_adapter(run, StageResult(stage="adapter", key="k2", path=adapter2), "u" * 64)
    assert nxt.iteration == 2 and version2 == "2"
    client = tracking.client(copy)
    assert client.get_run(run.run_id).info.artifact_uri.startswith(copy.resolve().as_uri())
    _, path2 = registry.resolve_adapter(copy, DOMAIN, version2)
    assert path2.is_relative_to(copy.resolve())
    experiment = client.get_experiment_by_name(f"flywheel-{DOMAIN}")
    assert experiment.artifact_location.startswith(copy.resolve().as_uri())
    assert json.loads((copy / "mlflow" / "location.json").read_text()) == {"home": str(copy.resolve())}

    assert snapshot(original) == before, "the copy wrote into the original home"
    assert not any(in_empty_cwd.iterdir()), f"written into the working directory: {os.listdir(in_empty_cwd)}"
    default = client.get_experiment("0").artifact_location  # MLflow's Default experiment lives in the home too
    assert default.startswith(copy.resolve().as_uri())


def test_links_use_the_ui_url_recorded_in_the_home(tmp_path, in_empty_cwd):
    home = tmp_path / "home"
    assert tracking.ui_base_url(home) == "http://127.0.0.1:5000"
    assert tracking.record_ui_url(home, "0.0.0.0", 5077) == "http://127.0.0.1:5077"
    assert tracking.model_version_url(home, DOMAIN, "3") == f"http://127.0.0.1:5077/#/models/flywheel-{DOMAIN}/versions/3"
    assert tracking.run_url(home, "1", "abc").startswith("http://127.0.0.1:5077/#/experiments/1/runs/abc")
