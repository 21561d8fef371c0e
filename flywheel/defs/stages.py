"""How assets call the core stages in the step process (the CPU stages; GPU stages go through pipes.py).

Stage functions are looked up when the step runs, not when the definitions load, so the graph is complete
even in a build where a stage's core code has not landed yet: its asset then fails with a clear message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from flywheel.workloads.entrypoint import ProgressReporter, result_metadata


def stage_function(name: str) -> Callable[..., Any]:
    from flywheel import stages

    fn = getattr(stages, name, None)
    if fn is None:
        raise dg.Failure(description=f"flywheel.stages.{name} is not in this build yet; this asset lands with its "
                                     "stage's issue", allow_retries=False)
    return fn


def run_stage(context: dg.AssetExecutionContext, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Call flywheel.stages.<name>(*args, progress=..., **kwargs) with progress in the run log; its result metadata."""
    result = stage_function(name)(*args, progress=ProgressReporter(context.log.info), **kwargs)
    meta = result_metadata(result)
    context.log.info(f"{result.stage}: {result.path}{' (reused)' if result.reused else ''}")
    return meta
