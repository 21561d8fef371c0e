"""One GPU per step: a file lock per device under the Dagster home, so concurrent steps (the `gpu` pool
lets up to `gpus` run at once) each get their own CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def visible_devices(gpus: int) -> list[str]:
    """The devices steps may use: the parent's CUDA_VISIBLE_DEVICES if set (first `gpus` of them), else 0..gpus-1."""
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (parent or [str(i) for i in range(gpus)])[:gpus]


@contextlib.contextmanager
def gpu_slot(lock_dir: str | Path, gpus: int, timeout_s: float = 6 * 3600,
             log: Callable[[str], None] | None = None) -> Iterator[str]:
    """Hold one free device for the duration of the block; yields its CUDA_VISIBLE_DEVICES value.

    gpus == 0 yields "" (no GPU visible: the step runs on CPU).
    """
    if gpus <= 0:
        yield ""
        return
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    devices = visible_devices(gpus)
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        for device in devices:
            handle = open(lock_dir / f"gpu-{device}.lock", "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
                yield device
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {devices} after {timeout_s:.0f}s (locks in {lock_dir}); "
                               "is the `gpu` pool limit higher than the number of GPUs?")
        if not warned and log:
            log(f"all {len(devices)} GPUs are busy; waiting for one (locks in {lock_dir})")
            warned = True
        time.sleep(1.0)
