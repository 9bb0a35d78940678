"""torch.distributed set-up for torchrun and Slurm (nccl on CUDA, gloo on the CPU; one process: no group),
and the few collectives the loops need."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


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
    """``None``/``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``"cuda"``
    gets the local rank. A device this machine lacks is a ``ValueError`` naming ``--device``."""
    if device in (None, "", "auto"):
        device = "cpu" if not torch.cuda.is_available() else "cuda"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r}: {e}; give auto, cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use --device cpu or auto"
        )
    dev = torch.device("cuda", local_rank) if dev.index is None else dev
    if dev.index >= (count := torch.cuda.device_count()):
        raise ValueError(
            f"--device {device}: this machine has {count} GPU(s) (process {local_rank} on this "
            f"node); start fewer processes per node"
        )
    torch.cuda.set_device(dev)
    return dev


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as the launcher set them: torchrun or scripts/slurm.py
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), srun (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
    ``SLURM_LOCALID``, set per task of a job step), else one process (a plain ``python`` in an
    allocation, whatever ``SLURM_NTASKS`` says: a batch script has no job step)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    try:
        rank, world, local = (int(env.get(n, "0")) for n in names)
    except ValueError:
        values = [env.get(n) for n in names]
        raise ValueError(f"the launcher's {'/'.join(names)} are not integers: {values}") from None
    if not 0 <= rank < world:
        raise ValueError(f"the launcher's {names[0]}={rank} is not a process of {names[1]}={world}")
    return rank, world, local


def init_distributed(
    device: str | None = None, timeout_minutes: int = 60, rendezvous_s: float = 600
) -> DistInfo:
    """Initialise the process group from the launcher's environment (no-op for one process). The
    processes meet within ``rendezvous_s`` seconds; a collective waits ``timeout_minutes``."""
    rank, world, local = launch_env()
    dev = resolve_device(device, local)
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if "MASTER_ADDR" not in os.environ:
            raise ValueError(
                "multi-process run without MASTER_ADDR/MASTER_PORT: start it with torchrun, or "
                "through scripts/slurm.py (which sets them from Slurm's environment)"
            )
        for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local)):
            os.environ.setdefault(name, str(value))
        _init_group(rank, world, dev, datetime.timedelta(minutes=timeout_minutes), rendezvous_s)
    return DistInfo(rank=rank, world_size=world, device=dev)


def _init_group(rank: int, world: int, dev: torch.device, timeout: Any, rendezvous_s: float):
    """The process group, once the processes met (within ``rendezvous_s``; torchrun: already)."""
    backend = "nccl" if dev.type == "cuda" else "gloo"
    addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    kw: dict[str, Any] = {"timeout": timeout} | ({"device_id": dev} if dev.type == "cuda" else {})
    torchrun = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    wait = timeout if torchrun else datetime.timedelta(seconds=rendezvous_s)
    try:
        if torchrun:
            return dist.init_process_group(backend, **kw)
        store = dist.TCPStore(addr, port, world, rank == 0, wait)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kw)
        store.set_timeout(timeout)
    except dist.DistError as e:  # timed out, refused, port in use
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RankError(
            f"process {rank} of {world} did not meet the others at "
            f"MASTER_ADDR:MASTER_PORT {addr}:{port} within {wait.total_seconds():g} s "
            f"({cause}); start all {world} processes together (torchrun, srun or "
            f"scripts/slurm.py) with the same MASTER_ADDR/MASTER_PORT"
        ) from None


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    box = [obj]
    if _active():
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


def report_error(message: str, status: int = 2) -> int:
    """Print ``error: message`` (one line) and return ``status``; under torchrun the message goes
    to its error file too, so that its failure summary names it (not a link to its docs)."""
    line = "error: " + " ".join(message.split())
    print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path and not os.path.exists(path):
        info = {"py_callstack": line, "timestamp": str(int(time.time()))}
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    return status


_GONE = ("/gloo/transport/", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` says that another process of the run went away (it reports its own error)."""
    gone = isinstance(e, dist.DistError) or any(s in str(e) for s in _GONE)
    return launch_env()[1] > 1 and gone


def exit_process(status: int) -> None:
    """End the process after :func:`cleanup` without the interpreter's finalization and the C++
    static destructors: native threads that outlive the process group (gloo's workers, the autograd
    threads of an FSDP backward) would meet a half torn-down runtime and abort a finished run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
