"""The flywheel's decisions as Dagster asset checks (the decisions themselves: flywheel.decisions).

Each stage declares its checks in flywheel.pipeline (`Stage.checks`); a blocking check that fails stops every
downstream asset of the run, and the CLI exits naming it. The check's description is the decision's line
(verdict, outcome, the failing criteria with value and threshold); its metadata holds every criterion.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import dagster as dg

from flywheel.decisions import Decision
from flywheel.defs.partitions import domain_partitions
from flywheel.pipeline import Check, Stage


def specs(stage: Stage) -> list[dg.AssetCheckSpec]:
    """Partitioned like the asset, so each result shows its domain (a Dagster preview feature: its warning is
    silenced here, the feature is what the check pages need)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return [dg.AssetCheckSpec(c.name, asset=stage.asset, blocking=c.blocking, description=c.description,
                                  partitions_def=domain_partitions) for c in stage.checks]


def results(stage: Stage, decisions: Sequence[Decision], partition: str) -> list[dg.AssetCheckResult]:
    """One result per declared check, from the decision of the same name. A check whose decision was not made
    (e.g. the fit check turned off) passes with a note saying so."""
    by_name = {d.name: d for d in decisions}
    return [result(stage, check, by_name.get(check.decision), partition) for check in stage.checks]


def result(stage: Stage, check: Check, decision: Decision | None, partition: str) -> dg.AssetCheckResult:
    severity = dg.AssetCheckSeverity.ERROR if check.blocking else dg.AssetCheckSeverity.WARN
    if decision is None:
        return dg.AssetCheckResult(check_name=check.name, asset_key=stage.asset, passed=True, severity=severity,
                                   description=f"not decided in this run (turned off in the config)",
                                   metadata={"domain": partition})
    metadata: dict[str, dg.MetadataValue] = {"domain": dg.MetadataValue.text(partition),
                                             "decided_by": dg.MetadataValue.text(decision.actor or "")}
    for criterion in decision.criteria:
        key = criterion.key
        value = criterion.value
        metadata[key] = (dg.MetadataValue.float(float(f"{value:.4g}")) if isinstance(value, float) and
                         value == value else dg.MetadataValue.text(str(value)))
        metadata[f"{key}_needs"] = dg.MetadataValue.text(criterion.rule)
    return dg.AssetCheckResult(check_name=check.name, asset_key=stage.asset, passed=decision.passed,
                               severity=severity, description=decision.line(), metadata=metadata)
