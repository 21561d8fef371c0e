"""The Dagster layer of the flywheel: thin. Every asset calls into the core library (flywheel.stages); no ML
code lives here. `dagster dev -w workspace.yaml` (or `flywheel ui`) loads `defs`."""

from flywheel.defs.definitions import build_definitions, defs

__all__ = ["build_definitions", "defs"]
