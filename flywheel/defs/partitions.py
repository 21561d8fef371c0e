"""One dynamic partition per domain: a robot cell, a camera view or a task family.

Each domain has its own demonstrations, adapter line and refreshed dataset. Domains are added from the
Dagster UI (the asset's partition picker), the CLI (`flywheel.defs.domains.add_domain`) or the inbox sensor.
"""

import dagster as dg

DOMAIN_PARTITIONS_NAME = "domain"

domain_partitions = dg.DynamicPartitionsDefinition(name=DOMAIN_PARTITIONS_NAME)
