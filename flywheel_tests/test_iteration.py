"""The main job end to end through the one orchestration path: `flywheel iterate` launches the Dagster job on the
home's instance, so the run, its 8 materializations and their checks are read back through the instance API;
`--iterations 2` chains two runs; a failing check stops the CLI with exit code 2 and its criteria."""

import json
from pathlib import Path

import dagster as dg
import pytest

from flywheel.cli import main
from flywheel.data.ingest import load_manifest
from flywheel.defs.instance import flywheel_instance
from flywheel.pipeline import STAGE_LIST

DOMAIN = "pusht-rotated"
# CPU-sized: 1 clip per episode, a short hot schedule that still moves the adapter, 3 two-step videos, a small IDM;
# no usefulness report, so the build-on decision gets no verdict and these runs accept "inconclusive"; filters
# calibrated on the raw clips (the codec references cost 17 of a run's 50 s here; the default `model_codec` path is
# run by defs/test_pipeline.py and quality/test_curation.py).
FAST = {
    "clips.max_clips_per_episode": 1,
    "train.steps": 10, "train.rank": 4, "train.alpha": 4, "train.checkpoint_every": 5, "train.learning_rate": 0.005,
    "train.warmup_steps": 1, "train.f_max": 1.0, "train.f_min": 1.0,
    "evaluate.max_clips": 1, "evaluate.seeds": [0],
    "generate.seeds": [0], "generate.max_videos": 3, "generate.num_inference_steps": 2,
    "label.idm.steps": 20, "label.idm.batch_size": 8,
    "label.idm.codec_augment": False,  # the codec's round trips of every episode: tested in test_stages
    "refresh.usefulness_report": False,
    "gates.curation.min_pass_rate": 0.0, "quality.calibrate_on": "real",
    "gates.refresh.build_on": ["better", "non-inferior", "inconclusive"],
}


def sets(values: dict) -> list[str]:
    return [f"--set={k}={json.dumps(v)}" for k, v in values.items()]


def runs_of(home: Path):
    instance = flywheel_instance(home)
    try:
        return instance, list(reversed(instance.get_runs()))  # oldest first
    except Exception:
        instance.dispose()
        raise


def test_iterate_is_a_dagster_run_with_every_asset_and_check_and_chains(tmp_path, capfd):
    """`flywheel iterate --iterations 2`: two Dagster runs of the job on the home's instance, the second ingesting
    the version the first refreshed; every asset materialized and every declared check evaluated in each."""
    home = tmp_path / "home"
    assert main(["iterate", "--iterations", "2", "--home", str(home), *sets(FAST)]) == 0
    out, err = capfd.readouterr()
    for stage in STAGE_LIST:  # a line per stage, with its decisions
        assert f"[{stage.asset}] done in" in err or f"[{stage.asset}] reused" in err, stage.asset
    assert "[adapter_evaluation] adapter gate passed" in err and "[training_clips] model fit passed" in err
    assert "[iterations] 2/2: ingesting the refreshed version" in err
    for noise in ("Svt[", "moov atom", "should be kept in float32", "mlflow.store.db", "PreviewWarning"):
        assert noise not in out + err, noise

    instance, runs = runs_of(home)
    try:
        assert len(runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        assert all(r.job_name == "flywheel_iteration" and r.tags["flywheel/launched_by"] == "flywheel CLI"
                   and r.tags["dagster/partition"] == DOMAIN for r in runs)
        first, second = runs
        records = instance.get_records_for_run(first.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        materialized = {r.event_log_entry.dagster_event.asset_key.path[-1]: r.event_log_entry.dagster_event
                        .event_specific_data.materialization for r in records}
        assert set(materialized) == {s.asset for s in STAGE_LIST}
        checks = instance.get_records_for_run(first.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION).records
        evaluations = {r.event_log_entry.dagster_event.event_specific_data.check_name:
                       r.event_log_entry.dagster_event.event_specific_data for r in checks}
        declared = {c.name for s in STAGE_LIST for c in s.checks}
        assert set(evaluations) == declared
        # no policy is evaluated on a CPU by default: that check says so as a warning, not as a pass
        unevaluated = evaluations.pop("policy_verdict")
        assert not unevaluated.passed and unevaluated.severity == dg.AssetCheckSeverity.WARN
        assert "not evaluated" in unevaluated.description and "policy.evaluate=on" in unevaluated.description
        assert all(e.passed for name, e in evaluations.items()), {n: e.description for n, e in evaluations.items()}
        meta = materialized["adapter_evaluation"].metadata
        assert meta["registered_version"].value == "1" and "mlflow_model_version_url" in meta
        first_version = Path(materialized["refreshed_dataset"].metadata["path"].value)

        # the second run ingested the version the first refreshed (the build-on decision accepted it)
        records = instance.get_records_for_run(second.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
        demos = next(r.event_log_entry.dagster_event.event_specific_data.materialization for r in records
                     if r.event_log_entry.dagster_event.asset_key.path[-1] == "demonstrations")
        root = Path(load_manifest(demos.metadata["path"].value).summary["dataset_root"]).resolve()
        assert root == first_version.resolve()
    finally:
        instance.dispose()
    manifest = load_manifest(demos.metadata["path"].value)
    real = manifest.frame[~manifest.frame["is_synthetic"]]
    assert len(real) == 10 and (manifest.frame.loc[manifest.frame["is_synthetic"], "split"] == "train").all()
    from flywheel.lineage.registry import list_adapters

    # one registry version per distinct adapter (an iteration whose clips came out the same as the last one's,
    # with no new synthetic episode accepted, reuses that adapter instead of registering a copy)
    trained = [p for p in (home / "adapters").iterdir() if not p.name.startswith(".")]
    versions = sorted(v["version"] for v in list_adapters(home, DOMAIN))
    assert len(versions) == len(trained) >= 1 and versions[0] == "1"


def test_a_failing_check_stops_the_cli_with_its_criteria_and_exit_code_2(tmp_path, capfd):
    home = tmp_path / "home"
    assert main(["ingest", "--home", str(home), "--set", "gates.demonstrations.min_episodes=50"]) == 2
    err = capfd.readouterr().err
    assert "check enough_episodes on demonstrations failed" in err and "episodes 10 (needs >= 50)" in err
    assert "Traceback" not in err
    instance, runs = runs_of(home)
    try:
        assert [r.status for r in runs] == [dg.DagsterRunStatus.FAILURE]  # the UI shows the same failed run
    finally:
        instance.dispose()


@pytest.mark.parametrize("bad", ["--set=train.rank=0", "--set=ingest.source=/nowhere/at/all"])
def test_bad_input_is_one_message_and_exit_code_2(tmp_path, capfd, bad):
    assert main(["iterate", "--home", str(tmp_path / "home"), bad]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and ("train.rank" in err or "/nowhere/at/all" in err)
