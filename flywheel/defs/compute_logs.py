"""Compute logs for runs the CLI executes in its own process: captured for the UI, not echoed.

Dagster's LocalComputeLogManager copies a step's stdout/stderr into files (the UI's stdout/stderr tabs) and
echoes them back to the terminal with `tail -F`. For `flywheel iterate` that echo is every library's chatter
(encoder configuration blocks, a framework's warnings, its own progress bars) between flywheel's lines, so
the CLI's instance uses this manager instead: the same files, in the same place, without the echo.
"""

from __future__ import annotations

import sys
from collections.abc import Generator, Sequence
from contextlib import contextmanager

from dagster._core.execution.compute_logs import redirect_to_file
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._utils import ensure_file, touch_file


class CapturedComputeLogManager(LocalComputeLogManager):
    @contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        outpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        errpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        ensure_file(outpath)
        ensure_file(errpath)
        with redirect_to_file(sys.stdout, outpath), redirect_to_file(sys.stderr, errpath):
            yield CapturedLogContext(log_key)
        touch_file(self.complete_artifact_path(log_key))  # the UI knows the capture is complete

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> CapturedComputeLogManager:
        return cls(inst_data=inst_data, **config_value)
