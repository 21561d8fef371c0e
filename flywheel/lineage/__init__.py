"""Lineage and adapter governance in MLflow: runs per iteration and step, datasets by content digest,
adapters as registered LoggedModels with candidate/champion aliases, and lineage queries both ways.

Importing this package does not import mlflow (it is imported on first use), nor dagster ever.
See docs/mlflow.md.
"""

from flywheel.lineage.query import (
    adapter_provenance,
    ancestry_of_adapter,
    lineage_of_synthetic_episode,
    products_of_adapter,
)
from flywheel.lineage.registry import (
    GateConfig,
    GateDecision,
    GateMetric,
    PromotionRefused,
    champion_version,
    evaluate_gate,
    gate_for_version,
    governance_history,
    links_for_version,
    list_adapters,
    promote,
    record_evaluation,
    register_adapter,
    resolve_adapter,
    rollback,
    show_adapter,
)
from flywheel.lineage.runs import (
    StepRun,
    finish_iteration_run,
    log_dataset_input,
    log_refreshed_dataset,
    log_synthetic_set,
    open_run,
    open_step_run,
    start_iteration_run,
    step_run,
)
from flywheel.lineage.tracking import ensure_tracking_store, tracking_env, tracking_uri

__all__ = [
    "GateConfig",
    "GateDecision",
    "GateMetric",
    "PromotionRefused",
    "StepRun",
    "adapter_provenance",
    "ancestry_of_adapter",
    "champion_version",
    "ensure_tracking_store",
    "evaluate_gate",
    "finish_iteration_run",
    "gate_for_version",
    "governance_history",
    "lineage_of_synthetic_episode",
    "links_for_version",
    "list_adapters",
    "log_dataset_input",
    "log_refreshed_dataset",
    "log_synthetic_set",
    "open_run",
    "open_step_run",
    "products_of_adapter",
    "promote",
    "record_evaluation",
    "register_adapter",
    "resolve_adapter",
    "rollback",
    "show_adapter",
    "start_iteration_run",
    "step_run",
    "tracking_env",
    "tracking_uri",
]
