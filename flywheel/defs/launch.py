"""Launch the flywheel job on a flywheel home's Dagster instance: what `flywheel iterate` and the stage
commands do.

The run is an ordinary run of `flywheel_iteration` (or of its asset selection up to one stage) in
`<home>/dagster`, the instance `flywheel ui` serves: it appears on the Runs page and in the asset catalog
with its checks, exactly like a run launched from the UI. Its config (the defaults, your YAML, --set) is
the run config's `resources.flywheel.config.run`, so the UI shows what ran. The steps execute in this
process (the CPU stages need no process of their own); GPU stages still go through the `gpu` pool and,
on a machine with GPUs, run as Pipes workloads.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from flywheel.config import FlywheelConfig
from flywheel.pipeline import STAGE_LIST, STAGES, up_to
from flywheel.stages import StageResult
from flywheel.store import resolve_home


@dataclass
class CheckOutcome:
    asset: str
    name: str
    passed: bool
    blocking: bool
    description: str


@dataclass
class RunOutcome:
    """What a launched run did: its id, its results, its checks and, when it failed, why."""

    run_id: str
    domain: str
    success: bool
    results: dict[str, StageResult] = field(default_factory=dict)
    checks: list[CheckOutcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "[asset] message" of each failed step
    unexpected: list[str] = field(default_factory=list)  # the full error (with its stack) of each step that hit a bug

    @property
    def failed_checks(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed and c.blocking]

    def check(self, name: str) -> CheckOutcome | None:
        return next((c for c in self.checks if c.name == name), None)

    def why(self) -> str:
        """Why the run stopped, in a few lines (the failed checks first: they name their criteria)."""
        lines = [f"check {c.name} on {c.asset} failed: {c.description}" for c in self.failed_checks]
        lines += [f for f in self.failures if not any(c.asset in f for c in self.failed_checks)]
        return "\n".join(lines) or "the run failed (see the Dagster UI's run page)"


def run_config(config: FlywheelConfig, home: Path) -> dict:
    """The Dagster run config that carries a FlywheelConfig (what the CLI passes; the Launchpad shows it)."""
    run = config.model_dump(mode="json", exclude={"home", "domain"})
    return {"resources": {"flywheel": {"config": {"home": str(home), "run": run}}},
            "loggers": {"flywheel_console": {"config": {"log_level": "INFO"}}}}


def launch(config: FlywheelConfig, until: str | None = None, launched_by: str = "flywheel CLI",
           only: bool = False) -> RunOutcome:
    """Run the iteration job (or the selection up to `until`, an asset name; with `only`, that asset alone on
    the domain's latest upstream results) for config.domain; never raises for a failed step or check: the
    outcome says what happened."""
    from flywheel.defs.definitions import build_definitions
    from flywheel.defs.instance import flywheel_instance, use_flywheel_instance
    from flywheel.defs.jobs import ITERATION_JOB
    from flywheel.defs.partitions import add_domain
    from flywheel.defs.resources import FlywheelResource
    from flywheel.runtime import configure_threads
    from flywheel.store import ArtifactStore

    home = resolve_home(config.home)
    os.environ["FLYWHEEL_HOME"] = str(home)
    threads = configure_threads()
    ArtifactStore(home).sweep()  # what killed writers left behind (their temp and scratch dirs)
    use_flywheel_instance(home)
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    instance = flywheel_instance(home, echo_step_output=False)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(instance.dispose)
        # Definitions resolve against the instance this run uses (a process that launched before, e.g. a test or
        # `--iterations`, may have left another instance's state storage current)
        cleanup.enter_context(set_defs_state_storage(instance.defs_state_storage))
        from flywheel.defs.run_status import reap_dead_runs

        reap_dead_runs(instance, home)  # a killed earlier run: its Dagster run, gpu slot and MLflow runs end
        add_domain(config.domain, home=home, instance=instance)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dg.PreviewWarning)
            defs = build_definitions(FlywheelResource.from_env())
        job = defs.resolve_job_def(ITERATION_JOB)
        selection = [until] if until and only else up_to(until) if until else [s.asset for s in STAGE_LIST]
        result = job.execute_in_process(
            run_config=run_config(config, home), instance=instance, partition_key=config.domain,
            raise_on_error=False, asset_selection=[dg.AssetKey(a) for a in selection],
            tags={"flywheel/launched_by": launched_by, "flywheel/selection": ",".join(selection),
                  "flywheel/torch_threads": f"{threads['torch_threads']} ({threads['threads_source']})"})
        # The run has ended: so do its MLflow parent runs (no daemon runs the run-status sensors here).
        from flywheel.defs.run_status import close_lineage_of_run

        close_lineage_of_run(home, instance.get_run_by_id(result.run_id))
        return outcome_of(result, config.domain)


def outcome_of(result: dg.ExecuteInProcessResult, domain: str) -> RunOutcome:
    outcome = RunOutcome(run_id=result.run_id, domain=domain, success=result.success)
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        meta = {k: (v.value if isinstance(v, dg.MetadataValue) else v) for k, v in mat.metadata.items()}
        if "stage" in meta:
            outcome.results[mat.asset_key.path[-1]] = StageResult.from_metadata(meta)
    for evaluation in result.get_asset_check_evaluations():
        asset = evaluation.asset_key.path[-1]
        declared = {c.name: c for c in STAGES[asset].checks} if asset in STAGES else {}
        outcome.checks.append(CheckOutcome(asset=asset, name=evaluation.check_name, passed=evaluation.passed,
                                           blocking=declared.get(evaluation.check_name, None) is not None
                                           and declared[evaluation.check_name].blocking,
                                           description=evaluation.description or ""))
    from flywheel.defs.pipes import EXPECTED

    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            user = getattr(event.event_specific_data, "user_failure_data", None)
            message = (user.description if user is not None and user.description else
                       _failure_message(error))
            outcome.failures.append(f"[{event.step_key}] {message}")
            expected = user is not None and EXPECTED in (user.metadata or {})
            blocked_by_check = error is not None and "DagsterAssetCheckFailedError" in error.to_string()
            if not expected and not blocked_by_check and error is not None:
                outcome.unexpected.append(f"[{event.step_key}] {error.to_string()}")
    return outcome


def _failure_message(error) -> str:
    """The innermost meaningful message of a serialized step error (a Failure's description, else the cause)."""
    if error is None:
        return "failed"
    while error.cause is not None and error.cls_name in ("DagsterExecutionStepExecutionError",
                                                          "DagsterUserCodeExecutionError"):
        error = error.cause
    return error.message.strip()
