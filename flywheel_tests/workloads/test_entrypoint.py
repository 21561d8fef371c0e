"""The workload harness: it runs a stage from a config file of any size (a GPU step's inputs carry preview
images, more than one command-line argument holds) and reports what the process spent where."""

import json
import time

from flywheel.config import REPO_ROOT, FlywheelConfig
from flywheel.defs.pipes import workload_command
from flywheel.workloads import entrypoint
from flywheel.workloads.stage import run as run_stage


def test_a_stage_runs_from_a_large_config_file_and_reports_its_process_times(tmp_path, capsys):
    config = FlywheelConfig(home=str(tmp_path / "home"),
                            ingest={"source": str(REPO_ROOT / "datasets" / "pusht_rotated")})
    big = "x" * 300_000  # what an upstream's embedded preview image adds to the inputs (Linux allows 128 KiB per argv)
    args = {"inputs": {}, "config": config.model_dump(mode="json"), "note": big}
    command = workload_command("python", "demonstrations", str(tmp_path / "home"), args, config_file=tmp_path / "a.json")
    assert command[-2:] == ["--config-file", str(tmp_path / "a.json")] and all(len(a) < 1000 for a in command)
    (tmp_path / "a.json").write_text(json.dumps(args))

    from flywheel.model.presets import model_loads

    loads_before = model_loads()  # the process's loads so far (other tests in this session may have loaded models)
    before = time.time()
    code = entrypoint.main(run_stage, command[command.index("--stage"):])
    assert code == 0, capsys.readouterr().err[-2000:]
    result = json.loads(capsys.readouterr().out)
    assert result["stage"] == "demonstrations" and result["episodes"] == 10
    measured = result["workload"]
    assert measured["process_started_at"] < before <= measured["run_started_at"] <= measured["run_ended_at"]
    assert measured["startup_s"] > 0 and measured["run_s"] > 0
    assert measured["model_loads"] == loads_before  # ingest loads no model
    assert "gpu_peak_allocated_gib" not in measured  # no CUDA here: no peak is made up


def test_model_loads_are_reported_with_their_parts(tmp_path):
    from flywheel.model.presets import load_pipeline

    load_pipeline("tiny", transformer_only=True)
    measured = entrypoint.workload_measurements(time.time() - 1, time.time())
    last = measured["model_loads"][-1]
    assert last["parts"] == "transformer" and last["preset"] == "tiny" and last["load_s"] >= 0
    assert measured["model_load_s"] >= last["load_s"]
