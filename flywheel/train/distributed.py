"""The processes of one job: one per GPU of a host, started by `torchrun` (or one process, the default).

`torchrun --nproc-per-node N` starts N copies of the same program with RANK / WORLD_SIZE / LOCAL_RANK in
the environment. Every copy runs the same code (training, generation); `World` says which copy this is and
does the few collective operations the stages need: a barrier, broadcasting or gathering small Python
objects, averaging gradients. Outside torchrun `current_world()` is a one-process world on which every
collective is a no-op, so single-GPU code runs unchanged.

Rules the stages keep so that the result does not depend on the number of processes:
- every rank draws the same random numbers (the whole global batch) and takes its own contiguous shard;
- only rank 0 writes shared files (checkpoints, final outputs), the others wait at a barrier;
- what is written holds nothing rank-dependent, so a run can resume on any number of GPUs.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# NCCL / gloo give up on a collective after this long (a rank that died hangs the others until then;
# torchrun normally stops them sooner, as soon as it sees one rank exit with an error).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the processes of the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files and reports progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, global_size: int, what: str = "train.batch_size") -> slice:
        """This rank's contiguous share of `global_size` items (which must divide evenly)."""
        if global_size % self.world_size:
            raise ValueError(f"{what} ({global_size}) must be divisible by the number of processes "
                             f"({self.world_size}, one per GPU); set {what} to a multiple of {self.world_size} "
                             "or run on fewer GPUs")
        size = global_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(**self._device_ids())

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (small, picklable objects: paths, dicts, error messages)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor (a copy; e.g. the loss of each rank's shard)."""
        value = value.detach().clone()
        if self.is_distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over ranks (one all-reduce of one flat buffer).

        A parameter without a gradient on this rank counts as zero, so every rank reduces the same layout.
        """
        if not self.is_distributed or not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in sorted({p.grad.dtype for p in params}, key=str):
            grads = [p.grad for p in params if p.grad.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def _device_ids(self) -> dict:
        return {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


SINGLE = World()
_world: World | None = None


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; it is set by torchrun") from None


def init_world(device: str | torch.device | None = None) -> World:
    """This process's `World`, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (idempotent).

    WORLD_SIZE > 1 starts torch.distributed: NCCL with device cuda:LOCAL_RANK (made the current CUDA
    device, so "cuda" means this rank's GPU everywhere), or gloo on CPU. `device` forces "cpu" or "cuda";
    None picks CUDA when available. Without torchrun: a one-process world on `device`.
    """
    global _world
    if _world is not None:
        return _world
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    wants_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if wants_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}); start as many "
                               "processes per node as GPUs")
        torch.cuda.set_device(local_rank)
        this_device = torch.device("cuda", local_rank)
    else:
        this_device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if this_device.type == "cuda" else "gloo"
        kwargs = {"device_id": this_device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    _world = World(rank=rank, world_size=world_size, local_rank=local_rank, device=this_device)
    return _world


def current_world() -> World:
    """The world `init_world` set up; a one-process world when there is no torchrun (or not yet initialised)."""
    if _world is not None:
        return _world
    if _env_int("WORLD_SIZE", 1) > 1:
        return init_world()
    return SINGLE


def shutdown_world() -> None:
    """Leave the process group (end of a torchrun program); a one-process world has nothing to do."""
    global _world
    if dist.is_initialized():
        dist.destroy_process_group()
    _world = None
