"""The gates on real robot data: the embedded default model (tiny-pusht) cannot represent the real Unitree G1
camera. The run stops at the model-fit check, naming the preset, the measured round-trip and what to do, with
nothing trained; with the fit check turned off, the adapter trained anyway is refused by the adapter gate with
its failing criteria named, in the CLI, the Dagster check and MLflow, and nothing is promoted."""

import dagster as dg
import pytest

from flywheel.cli import main
from flywheel.defs.instance import flywheel_instance
from flywheel_tests.conftest import REPO_ROOT

DOMAIN = "g1"
G1 = ["--domain", DOMAIN, f"--set=ingest.source={REPO_ROOT / 'datasets' / 'g1_pick_bottle'}",
      "--set=clips.max_clips_per_episode=1", "--set=evaluate.max_clips=2"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("g1") / "home"


def test_the_fit_check_stops_the_run_before_any_training(home, capfd):
    assert main(["train", "--home", str(home), *G1]) == 2
    err = capfd.readouterr().err
    assert "check model_fits_the_data on training_clips failed" in err
    for words in ("model tiny-pusht cannot represent this video", "dB PSNR", "needs >= 20 dB",
                  "model.preset: cosmos-predict2.5-2b", "gates.fit.enabled: false"):
        assert words in err, words
    assert "Traceback" not in err
    assert not (home / "adapters").exists() or not any((home / "adapters").iterdir())  # nothing trained


def test_without_the_fit_check_the_adapter_gate_refuses_and_names_the_criteria(home, capfd):
    from flywheel.lineage import registry, tracking

    assert main(["evaluate", "--home", str(home), *G1, "--set=gates.fit.enabled=false"]) == 0
    err = capfd.readouterr().err
    line = next(line for line in err.splitlines() if "[adapter_evaluation] adapter gate" in line)
    assert "adapter gate failed: refused: champion stays none" in line
    assert registry.champion_version(home, DOMAIN) is None  # nothing promoted
    (version,) = [v["version"] for v in registry.list_adapters(home, DOMAIN)]
    failed = [c for c in ("PSNR gain over base", "SSIM drop vs base", "filter pass-rate drop vs base") if c in line]
    assert failed, line  # at least one criterion named with its value and threshold
    # the same decision in the Dagster check ...
    instance = flywheel_instance(home)
    try:
        latest = instance.get_runs(limit=1)[0]
        checks = instance.get_records_for_run(latest.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        gate = next(r.event_log_entry.dagster_event.event_specific_data for r in checks
                    if r.event_log_entry.dagster_event.event_specific_data.check_name == "adapter_gate")
        assert gate.passed is False and gate.description == line.split("] ", 1)[1]
    finally:
        instance.dispose()
    # ... and in MLflow: the version's gate tag and a governance run with the reasons
    client = tracking.client(home)
    assert client.get_model_version(tracking.registered_model_name(DOMAIN), version).tags["flywheel.gate"] == "failed"
    events = registry.governance_history(home, DOMAIN)
    assert [e["event"] for e in events] == ["promote-refused"]
