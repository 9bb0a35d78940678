"""torch.distributed set-up for torchrun and Slurm (nccl on CUDA, gloo on the CPU; one process: no group),
and the few collectives the loops need."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "resolve_device", "barrier", "broadcast_object", "gather_object", "on_rank0",
           "rank0_first", "RankError", "cleanup"]


class RankError(RuntimeError):
    """Another rank failed; its error is in the message."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``"cuda"`` gets the local rank."""
    if device in (None, "", "auto"):
        device = "cpu" if not torch.cuda.is_available() else "cuda"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for but CUDA is not available; pass --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _env_int(*names: str, default: int | None = None) -> int | None:
    return next((int(os.environ[name]) for name in names if name in os.environ), default)


def init_distributed(device: str | None = None, timeout_minutes: int = 60) -> DistInfo:
    """Initialise the process group from the launcher's environment (no-op for one process)."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    dev = resolve_device(device, local)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("multi-process run without MASTER_ADDR/MASTER_PORT: start it with torchrun, or through "
                               "scripts/slurm.py (which sets them from Slurm's environment)")
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
            os.environ.setdefault(name, str(value))
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return DistInfo(rank=rank, world_size=world, device=dev)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], Any], what: str = "", broadcast: bool = True) -> Any:
    """``fn()`` on rank 0 only; its result goes to every rank (``broadcast``) or stays on rank 0; its
    exception is raised on rank 0 unchanged and as a :class:`RankError` elsewhere, so no rank waits."""
    result, exc = None, None
    if not _active() or dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            exc = e
    msg = broadcast_object(None if exc is None else f"{type(exc).__name__}: {exc}")
    if exc is not None:
        raise exc
    if msg is not None:
        raise RankError(f"rank 0 failed{' ' + what if what else ''}: {msg}")
    return broadcast_object(result) if broadcast else result


def rank0_first(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0, then on the others (e.g. a download into a shared cache)."""
    result = on_rank0(fn, "during set-up") if _active() else fn()
    if _active() and dist.get_rank() != 0:
        result = fn()
    barrier()
    return result


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
