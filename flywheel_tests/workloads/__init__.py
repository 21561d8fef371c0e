"""Tests of the workload entrypoints (flywheel.workloads) and how the Dagster layer launches them."""
