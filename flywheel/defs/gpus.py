"""GPUs per step: a file lock per device under the Dagster home, so concurrent steps (the `gpu` pool lets up
to `gpus` run at once) each get their own CUDA_VISIBLE_DEVICES: one device, or `count` devices for a step
that runs on several GPUs (training / generation under torchrun)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def visible_devices(gpus: int) -> list[str]:
    """The devices steps may use: the parent's CUDA_VISIBLE_DEVICES if set (first `gpus` of them), else 0..gpus-1."""
    parent = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (parent or [str(i) for i in range(gpus)])[:gpus]


def _try_lock(lock_dir: Path, device: str) -> IO | None:
    handle = open(lock_dir / f"gpu-{device}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _unlock(handles: list[IO]) -> None:
    for handle in handles:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _lock_free_devices(lock_dir: Path, devices: list[str], count: int) -> tuple[list[str], list[IO]] | None:
    """`count` devices locked at once, or none: a step never holds some devices while waiting for more
    (two 4-GPU steps each holding 2 of 4 devices would wait for each other forever)."""
    taken, handles = [], []
    for device in devices:
        handle = _try_lock(lock_dir, device)
        if handle is not None:
            taken.append(device)
            handles.append(handle)
            if len(taken) == count:
                return taken, handles
    _unlock(handles)
    return None


@contextlib.contextmanager
def gpu_slot(lock_dir: str | Path, gpus: int, timeout_s: float = 6 * 3600,
             log: Callable[[str], None] | None = None, count: int = 1) -> Iterator[str]:
    """Hold `count` free devices for the duration of the block; yields their CUDA_VISIBLE_DEVICES value ("3", "0,1").

    gpus == 0 yields "" (no GPU visible: the step runs on CPU).
    """
    if gpus <= 0:
        yield ""
        return
    devices = visible_devices(gpus)
    if not 1 <= count <= len(devices):
        raise ValueError(f"a step asks for {count} GPUs but this machine has {len(devices)} ({devices}); "
                         "set flywheel.gpus_per_step to at most flywheel.gpus (FLYWHEEL_GPUS_PER_STEP <= FLYWHEEL_GPUS)")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        locked = _lock_free_devices(lock_dir, devices, count)
        if locked is not None:
            taken, handles = locked
            try:
                yield ",".join(taken)
            finally:
                _unlock(handles)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {count} free GPU(s) among {devices} after {timeout_s:.0f}s (locks in {lock_dir}); "
                               "is the `gpu` pool limit higher than the number of GPUs?")
        if not warned and log:
            log(f"fewer than {count} of the {len(devices)} GPUs are free; waiting (locks in {lock_dir})")
            warned = True
        time.sleep(1.0)
