"""demonstrations: a domain's LeRobot dataset (or raw video folder) -> a validated episode manifest."""

import dagster as dg

from flywheel.defs import checks
from flywheel.defs.config import core_config_class, stage_settings
from flywheel.defs.domains import registration, resolve_source
from flywheel.defs.lineage import stage_params, step_lineage
from flywheel.defs.partitions import domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.defs.results import materialize
from flywheel.defs.stages import run_stage

IngestSettings = stage_settings(
    "ingest", "IngestSettings",
    defaults={"source": ""},  # '' = the domain's registered source, else <inbox>/<domain>
    launchpad_only={
        "min_episodes": (int, 2, "gate: fewest episodes the manifest may have"),
        "min_train_episodes": (int, 1, "gate: fewest train episodes"),
        "min_val_episodes": (int, 1, "gate: fewest val episodes (the adapter evaluation uses them)"),
        "follow_refreshed": (bool, True, "ingest the domain's newest refreshed dataset version (recorded by "
                                         "refreshed_dataset) rather than its registered source, so each "
                                         "iteration builds on the last; false: the registered source"),
    },
)
# Ingest settings a domain registration may carry (the Launchpad value wins when it is not the default).
REGISTERED_FIELDS = ("format", "camera_key", "repo_id", "val_fraction", "test_fraction")


def ingest_values(config, registered: dict) -> dict:
    core = core_config_class("ingest")
    values = config.core_values()
    for name in REGISTERED_FIELDS:
        field = core.model_fields.get(name) if core else None
        if name in registered and field is not None and values.get(name) == field.get_default(call_default_factory=True):
            values[name] = registered[name]
    return values


@dg.asset(
    name="demonstrations",
    group_name="ingest",
    partitions_def=domain_partitions,
    check_specs=[checks.spec("demonstrations", checks.DEMONSTRATIONS_CHECK,
                             "manifest schema and episode counts (total, train, val) within the gate")],
    kinds={"lerobot", "parquet"},
    description="The domain's demonstrations, checked episode by episode, as an episode manifest "
                "(<home>/manifests/<key>). Source: the Launchpad `source`, the domain's newest refreshed version, its "
                "registered source, or <inbox>/<domain>.",
)
def demonstrations(context: dg.AssetExecutionContext, config: IngestSettings, flywheel: FlywheelResource):
    home = flywheel.home_path
    domain = context.partition_key
    registered = registration(home, domain)
    values = ingest_values(config, registered)
    values["source"] = resolve_source(home, flywheel.inbox_path, domain, config.source, config.follow_refreshed)
    ingest_config = config.to_core("ingest", **values)
    params = stage_params(ingest_config, gate={"min_episodes": config.min_episodes,
                                               "min_train_episodes": config.min_train_episodes,
                                               "min_val_episodes": config.min_val_episodes})
    with step_lineage(context, flywheel, params) as lineage:
        meta = run_stage(context, "ingest_stage", home, ingest_config)
        lineage.record(meta, inputs={})
    check = checks.demonstrations_check(meta, config.min_episodes, config.min_train_episodes, config.min_val_episodes)
    return materialize(meta, check_results=[check], links=lineage.metadata)
