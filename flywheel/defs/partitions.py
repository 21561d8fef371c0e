"""One dynamic partition per domain: a robot cell, a camera view or a task family.

Each domain has its own demonstrations, adapter line and refreshed dataset. Domains are added from the
Dagster UI (the asset's partition picker), the CLI (`flywheel domain add`, `flywheel iterate` for its
config's domain) or the inbox sensor.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from flywheel.domains import check_domain_name, register_domain
from flywheel.store import resolve_home

DOMAIN_PARTITIONS_NAME = "domain"

domain_partitions = dg.DynamicPartitionsDefinition(name=DOMAIN_PARTITIONS_NAME)


def add_domain(domain: str, source: str | Path | None = None, home: str | Path | None = None, instance=None,
               **ingest: object) -> str:
    """Add a domain partition to the home's Dagster instance (and register its source when given)."""
    from flywheel.defs.instance import flywheel_instance

    check_domain_name(domain)
    home = resolve_home(home)
    if source is not None or ingest:
        register_domain(home, domain, source, **ingest)
    own = instance is None
    instance = instance or flywheel_instance(home)
    try:
        if not instance.has_dynamic_partition(DOMAIN_PARTITIONS_NAME, domain):
            instance.add_dynamic_partitions(DOMAIN_PARTITIONS_NAME, [domain])
    finally:
        if own:
            instance.dispose()
    return domain
