"""The inbox sensor: a LeRobot dataset dropped into `<inbox>/<domain>/` becomes (or updates) that domain and
starts an iteration for it.

A dataset counts as new when its fingerprint (metadata contents, file names and sizes) differs from the
last one seen (the cursor); it is picked up once no file has changed for `inbox_settle_seconds`, so a copy
in progress is not ingested half-way. The run key includes the fingerprint: the same data never runs twice.
"""

import json
import time

import dagster as dg

from flywheel.defs.jobs import flywheel_iteration
from flywheel.defs.partitions import DOMAIN_PARTITIONS_NAME, domain_partitions
from flywheel.defs.resources import FlywheelResource
from flywheel.domains import register_domain, scan_inbox


@dg.sensor(
    job=flywheel_iteration,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches the inbox (<home>/inbox or FLYWHEEL_INBOX) for new or changed LeRobot datasets; adds the "
                "domain partition and requests a flywheel_iteration run for it.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, flywheel: FlywheelResource):
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    datasets, problems = scan_inbox(flywheel.inbox_path)
    for problem in problems:
        context.log.warning(problem)
    known = set(context.instance.get_dynamic_partitions(DOMAIN_PARTITIONS_NAME))
    new_domains: list[str] = []
    requests: list[dg.RunRequest] = []
    now = time.time()
    for ds in datasets:
        if seen.get(ds.domain) == ds.fingerprint:
            continue
        if now - ds.last_change < flywheel.inbox_settle_seconds:
            context.log.info(f"{ds.path}: changed {now - ds.last_change:.0f}s ago, waiting for the copy to settle")
            continue
        register_domain(flywheel.home_path, ds.domain, ds.path)
        if ds.domain not in known:
            new_domains.append(ds.domain)
        seen[ds.domain] = ds.fingerprint
        requests.append(dg.RunRequest(partition_key=ds.domain, run_key=f"{ds.domain}-{ds.fingerprint}",
                                      tags={"flywheel/source": str(ds.path), "flywheel/trigger": "inbox"}))
        context.log.info(f"{ds.path}: {'new' if ds.domain not in known else 'updated'} domain {ds.domain!r}, "
                         "requesting an iteration")
    if not requests:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no new datasets in {flywheel.inbox_path}"),
                               cursor=json.dumps(seen, sort_keys=True))
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[domain_partitions.build_add_request(new_domains)] if new_domains else [],
        cursor=json.dumps(seen, sort_keys=True),
    )
