"""The inbox sensor adds (or updates) a domain partition and requests an iteration; domains resolve their data."""

import datetime
import json
import os
import shutil
import time

import dagster as dg
import pytest

from flywheel.defs.partitions import add_domain
from flywheel.defs.resources import FlywheelResource
from flywheel.domains import SAMPLE_DATASET, SAMPLE_DOMAIN, record_refreshed_version, registration, resolve_source, scan_inbox
from flywheel.errors import ConfigError, DataError

from flywheel.defs.schedules import flywheel_iteration_schedule
from flywheel.defs.sensors import inbox_sensor


@pytest.fixture
def inbox_dataset(robot_datasets, tmp_path):
    """The v2.1 G1 sample (3 episodes, real LeRobot metadata) copied into an inbox as domain `g1-cell`."""
    inbox = tmp_path / "inbox"
    shutil.copytree(robot_datasets / "g1_pick_bottle_v21", inbox / "g1-cell")
    old = time.time() - 3600  # the copy finished an hour ago: settled
    for p in (inbox / "g1-cell").rglob("*"):
        os.utime(p, (old, old))
    return inbox


def evaluate(instance, flywheel, cursor=None) -> dg.SensorResult:
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"flywheel": flywheel})
    return inbox_sensor(context)


def apply(instance, result: dg.SensorResult) -> None:
    """What the daemon does with a sensor result's partition requests."""
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))


def test_new_dataset_adds_the_domain_and_requests_a_run(inbox_dataset, tmp_path):
    flywheel = FlywheelResource(home=str(tmp_path / "home"), inbox=str(inbox_dataset), inbox_settle_seconds=5)
    with dg.instance_for_test() as instance:
        result = evaluate(instance, flywheel)
        (request,) = result.dynamic_partitions_requests
        assert request.partitions_def_name == "domain" and list(request.partition_keys) == ["g1-cell"]
        (run,) = result.run_requests
        assert run.partition_key == "g1-cell" and run.tags["flywheel/trigger"] == "inbox"
        assert registration(tmp_path / "home", "g1-cell")["source"] == str((inbox_dataset / "g1-cell").resolve())
        apply(instance, result)
        assert instance.get_dynamic_partitions("domain") == ["g1-cell"]

        again = evaluate(instance, flywheel, cursor=result.cursor)  # same data: nothing new
        assert not again.run_requests and not again.dynamic_partitions_requests

        # an updated dataset (a new episode's metadata) re-runs the domain, without re-adding it
        info = inbox_dataset / "g1-cell" / "meta" / "info.json"
        meta = json.loads(info.read_text())
        meta["total_episodes"] += 1
        info.write_text(json.dumps(meta))
        old = time.time() - 60
        os.utime(info, (old, old))
        updated = evaluate(instance, flywheel, cursor=result.cursor)
        (run2,) = updated.run_requests
        assert run2.partition_key == "g1-cell" and run2.run_key != run.run_key
        assert not updated.dynamic_partitions_requests


def test_a_copy_in_progress_waits_and_bad_names_are_reported(inbox_dataset, tmp_path):
    flywheel = FlywheelResource(home=str(tmp_path / "home"), inbox=str(inbox_dataset), inbox_settle_seconds=600)
    (inbox_dataset / "g1-cell" / "meta" / "info.json").touch()  # just written
    shutil.copytree(inbox_dataset / "g1-cell", inbox_dataset / "Bad Name")
    with dg.instance_for_test() as instance:
        result = evaluate(instance, flywheel)
        assert not result.run_requests
    datasets, problems = scan_inbox(inbox_dataset)
    assert [d.domain for d in datasets] == ["g1-cell"]
    assert any("'Bad Name' is not a valid domain name" in p for p in problems)


def test_add_domain_registers_its_source_and_the_partition(robot_datasets, tmp_path):
    home = tmp_path / "home"
    with dg.instance_for_test() as instance:
        add_domain("g1", robot_datasets / "g1_pick_bottle", home=home, instance=instance,
                   camera_key="observation.images.cam_high")
        assert instance.get_dynamic_partitions("domain") == ["g1"]
    assert resolve_source(home, home / "inbox", "g1", None) == str((robot_datasets / "g1_pick_bottle").resolve())
    assert resolve_source(home, home / "inbox", "g1", "/elsewhere") == "/elsewhere"  # the Launchpad wins
    assert registration(home, "g1")["camera_key"] == "observation.images.cam_high"
    with pytest.raises(DataError, match="has no demonstrations: set ingest.source"):
        resolve_source(home, home / "inbox", "nowhere", None)
    with pytest.raises(ConfigError, match="lower-case letters"):
        add_domain("Cell 3", home=home)
    # the embedded sample domain needs no registration: its demonstrations are the sample in the repository
    assert resolve_source(home, home / "inbox", SAMPLE_DOMAIN, None) == str(SAMPLE_DATASET)


def test_a_refreshed_version_is_the_domains_next_source_until_it_is_registered_again(robot_datasets, tmp_path):
    home, source = tmp_path / "home", robot_datasets / "g1_pick_bottle"
    add_domain("g1", source, home=home, instance=dg.DagsterInstance.ephemeral(), camera_key="observation.images.cam_high")
    version = tmp_path / "datasets" / "v2"
    version.mkdir(parents=True)
    record_refreshed_version(home, "g1", version)
    assert registration(home, "g1")["source"] == str(source.resolve()), "the registered source is kept"
    assert registration(home, "g1")["camera_key"] == "observation.images.cam_high"
    assert resolve_source(home, home / "inbox", "g1", None) == str(version.resolve())
    assert resolve_source(home, home / "inbox", "g1", None, follow_refreshed=False) == str(source.resolve())
    assert resolve_source(home, home / "inbox", "g1", "/elsewhere") == "/elsewhere"
    version.rmdir()
    with pytest.raises(DataError, match="refreshed dataset version .* is gone"):
        resolve_source(home, home / "inbox", "g1", None)
    add_domain("g1", source, home=home, instance=dg.DagsterInstance.ephemeral())  # new real data: a new line
    assert resolve_source(home, home / "inbox", "g1", None) == str(source.resolve())


def test_schedule_requests_one_run_per_domain():
    with dg.instance_for_test() as instance:
        context = dg.build_schedule_context(instance=instance)
        assert isinstance(flywheel_iteration_schedule(context), dg.SkipReason)
        instance.add_dynamic_partitions("domain", ["cell-a", "cell-b"])
        at = datetime.datetime(2026, 1, 2, 3, 0, tzinfo=datetime.timezone.utc)
        runs = flywheel_iteration_schedule(dg.build_schedule_context(instance=instance, scheduled_execution_time=at))
        assert sorted(r.partition_key for r in runs) == ["cell-a", "cell-b"]
        assert runs[0].run_key == "cell-a-20260102T0300"
