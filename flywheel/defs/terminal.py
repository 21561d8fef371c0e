"""What a run shows on a terminal: flywheel's stage lines and progress bars, not Dagster's event stream.

`flywheel_console` is the job's logger (Definitions' default): it prints the messages the assets log at
INFO and above (the stage lines "[adapter] done in 15.5s: ..." and the decisions), warnings and errors,
and leaves Dagster's own events (step started, materialization stored, ...) to the UI's event log, which
records everything either way. Progress goes to the run's log at DEBUG level (throttled), and, when the
process that runs the step has a terminal installed (`flywheel iterate` does), to tqdm bars on it.

A step's own stdout/stderr (a library's warnings, its tqdm bars) is captured by Dagster into the step's
compute logs (the UI's stdout/stderr tabs). `flywheel iterate` therefore installs a `Terminal` on a copy of
the process's stderr made before any step runs, so flywheel's lines reach the user and the chatter does not.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import dagster as dg

from flywheel.workloads.entrypoint import ProgressReporter

_terminal: Terminal | None = None


class Terminal:
    """Where flywheel's lines and bars go: a tqdm bar per (stage, step) of the progress events {"stage", "step"?,
    "done", "total", ...}, and the stage lines written above the bars."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bars: dict[str, object] = {}

    @classmethod
    def on_stderr(cls) -> Terminal:
        """A terminal on a duplicate of this process's stderr (Dagster's capture of fd 2 does not reach it)."""
        import os

        return cls(os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1))

    def line(self, message: str) -> None:
        from tqdm.auto import tqdm

        if self.bars:
            tqdm.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def __call__(self, asset: str, event: dict) -> None:
        """One bar per asset (a stage's phases, e.g. ingest's check then copy, reuse it in turn)."""
        from tqdm.auto import tqdm

        if not isinstance(event.get("done"), int) or not isinstance(event.get("total"), int):
            return
        # a named phase ("check videos", "encode"); a numeric `step` is a counter inside the item, not a phase
        phase = event.get("step") if isinstance(event.get("step"), str) else event.get("stage")
        label = f"[{asset}]" + (f" {phase}" if phase and phase != asset else "")
        bar = self.bars.get(asset)
        if bar is None or bar.desc != label or event["done"] < bar.n:
            if bar is not None:
                bar.close()
            bar = self.bars[asset] = tqdm(total=event["total"], desc=label, leave=False, file=self.stream,
                                          dynamic_ncols=True, position=0)
        bar.total = event["total"]
        bar.n = event["done"]
        shown = {k: v for k, v in event.items() if k not in ("done", "total") and isinstance(v, (int, float))
                 and not isinstance(v, bool)}
        if shown:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in shown.items()}, refresh=False)
        bar.refresh()
        if event["done"] >= event["total"]:
            bar.close()
            del self.bars[asset]

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def install_terminal(terminal: Terminal | None) -> None:
    """Show the steps run in this process (their lines and progress bars) on `terminal`; None stops it."""
    global _terminal
    _terminal = terminal


def stage_progress(context: dg.AssetExecutionContext, asset: str) -> Callable[[dict], None]:
    """The progress callback of a step: throttled DEBUG lines in the run's log, bars on an installed terminal."""
    to_log = ProgressReporter(lambda line: context.log.debug(f"[{asset}] {line}"))

    def report(event: dict) -> None:
        to_log(event)
        if _terminal is not None:
            _terminal(asset, event)

    return report


class _StageLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        if meta.get("dagster_event") is not None:
            return  # Dagster's own events: the UI's event log has them
        message = meta.get("orig_message", record.getMessage())
        if message.startswith("Dependencies for step"):  # Dagster's skip notice, one per downstream step
            message = f"[{meta.get('step_key') or 'flywheel'}] not run: an upstream step did not succeed"
        elif record.levelno >= logging.WARNING and not message.startswith("["):
            step = meta.get("step_key") or "flywheel"
            message = f"[{step}] {message}"
        (_terminal or Terminal()).line(message)


@dg.logger(
    config_schema={"log_level": dg.Field(str, is_required=False, default_value="INFO")},
    description="flywheel's stage lines and decisions on the terminal (Dagster's events stay in the UI's log)",
)
def flywheel_console(init_context: dg.InitLoggerContext) -> logging.Logger:
    logger = logging.getLogger("flywheel.console")
    logger.setLevel(init_context.logger_config["log_level"])
    logger.propagate = False
    logger.handlers = [_StageLines()]
    return logger
