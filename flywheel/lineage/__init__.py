"""Lineage and adapter governance in MLflow: runs per iteration and step, datasets by content digest,
adapters as registered LoggedModels with candidate/champion aliases, and lineage queries both ways.

    tracking   the store (sqlite in the home, or a server), experiments, locks, UI links
    runs       iteration and step runs, datasets by content digest
    registry   adapter versions, aliases and governance runs (the rules live in flywheel.decisions)
    query      lineage both ways: what an adapter came from, what it produced
    recorder   what one iteration records after each stage

Import the module you need (`from flywheel.lineage import registry`); importing this package imports
nothing (mlflow is imported on first use), and never dagster. See docs/mlflow.md.
"""
