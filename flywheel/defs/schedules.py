"""A schedule for the whole iteration, off by default: turn it on in the UI (Automation) when wanted."""

import os

import dagster as dg

from flywheel.defs.jobs import flywheel_iteration
from flywheel.defs.partitions import DOMAIN_PARTITIONS_NAME

DEFAULT_CRON = "0 3 * * *"  # nightly, when the GPUs are idle


@dg.schedule(
    job=flywheel_iteration,
    cron_schedule=os.environ.get("FLYWHEEL_SCHEDULE_CRON", DEFAULT_CRON),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Runs flywheel_iteration for every domain (cron: $FLYWHEEL_SCHEDULE_CRON, default nightly at 03:00).",
)
def flywheel_iteration_schedule(context: dg.ScheduleEvaluationContext):
    domains = context.instance.get_dynamic_partitions(DOMAIN_PARTITIONS_NAME)
    if not domains:
        return dg.SkipReason("no domains yet: add one in the UI, with the CLI, or drop a dataset into the inbox")
    stamp = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [dg.RunRequest(partition_key=d, run_key=f"{d}-{stamp}") for d in sorted(domains)]
