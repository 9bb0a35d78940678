"""A training run across processes and preemptions: DDP or FSDP2, an fp32 EMA, checkpoints, stop signals."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lpd.distributed import DistInfo, broadcast_object, gather_object, on_rank0
from lpd.files import (
    STATE_FILE,
    CheckpointError,
    check_finite,
    check_state_dict,
    checkpoint_args,
    load_checkpoint,
    load_into,
    lock_file,
    replace_dir,
    save_checkpoint,
    temp_dir_for,
)

LOCK_FILE = "train.lock"  # held by the training that writes an output folder
Log = Callable[[str], None]


def distribute(
    model: torch.nn.Module, info: DistInfo, fsdp=False, bf16=False, cpu_offload=False
) -> torch.nn.Module:
    """The module a training step calls: ``model`` on its device, FSDP2-sharded in place (each block, then
    the root; ``bf16`` on GPUs: bf16 compute, fp32 gradient reduction), under DDP, or itself."""
    device = info.device
    if not fsdp:
        model.to(device)
        if not info.distributed:
            return model
        ids = [device.index] if device.type == "cuda" else None
        unused = model.label_drop_prob == 0
        return torch.nn.parallel.DistributedDataParallel(model, ids, find_unused_parameters=unused)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process: a group of one
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    kw: dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if bf16 and device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for block in model.blocks:
        fully_shard(block, **kw)
    return fully_shard(model, **kw)


def settle_ddp_buckets(ddp_model: torch.nn.Module, batch: int, sizes: Sequence[int], autocast):
    """One throw-away forward/backward, so that every (re)started process steps with the gradient buckets DDP
    rebuilds after its first backward (they set the all-reduce's summation order); weights are untouched."""
    model = ddp_model.module
    N, device = model.num_tokens, model.pos_embed.device
    C = model.config.text_dim
    text = {} if model.text is None else {"text": torch.zeros(batch, 1, C, device=device)}
    labels = None if text else torch.zeros(batch, dtype=torch.long, device=device)
    tokens = torch.zeros(batch, N, dtype=torch.long, device=device)
    order = torch.arange(N, device=device).expand_as(tokens)
    with autocast:
        loss = ddp_model(tokens, labels, order, sizes, **text)
    loss.backward()
    model.zero_grad(set_to_none=True)


class EMA:
    """fp32 ``ema = decay * ema + (1 - decay) * weights`` of a model's parameters (sharded as they are)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.params = decay, dict(model.named_parameters())
        self.state = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        weights = [p.detach() for p in self.params.values()]
        torch._foreach_lerp_(list(self.state.values()), weights, 1.0 - self.decay)

    @torch.no_grad()
    def restart(self) -> None:
        """Start again from the current weights."""
        for k, p in self.params.items():
            self.state[k].copy_(p.detach())


def full_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors of a state dict that may be sharded (then a collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in sd.items()}


def last_checkpoint(folder: str, sharded: bool) -> str | None:
    """The run's ``checkpoint-last.pth`` or (FSDP) ``checkpoint-last`` folder (``.old`` during a swap), if any."""
    names = ("checkpoint-last", "checkpoint-last.old") if sharded else ("checkpoint-last.pth",)
    return next((p for p in (os.path.join(folder, n) for n in names) if os.path.exists(p)), None)


def _save_sharded(paths: Sequence[str], tensors: dict, meta: dict, info: DistInfo) -> None:
    """Every rank writes its shards, rank 0 ``state.pth``; each of ``paths`` then appears whole."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
    from torch.distributed.checkpoint.api import CheckpointException

    tmp = broadcast_object(temp_dir_for(paths[0]) if info.is_main else None)

    def publish() -> None:
        _save({**meta, "sharded": sorted(tensors)}, os.path.join(tmp, STATE_FILE), paths[0])
        for path in paths[1:]:  # more names for the same state: hard links, no second write
            copy = f"{tmp}-{os.path.basename(path)}"
            shutil.copytree(tmp, copy, copy_function=os.link)
            replace_dir(copy, path)
        replace_dir(tmp, paths[0])

    try:
        try:
            save(tensors, storage_writer=HuggingFaceStorageWriter(tmp, save_distributed=True))
        except CheckpointException as e:  # a BaseException: made an ordinary error naming the cause
            last = str(e).strip().splitlines()[-1]
            raise CheckpointError(
                f"writing {paths[0]} failed ({last}); the last good checkpoint is kept"
            ) from e
        on_rank0(publish, "while publishing the checkpoint", broadcast=False)
    finally:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def _save(state: dict, path: str, shown: str | None = None) -> None:
    """:func:`save_checkpoint`; a full disk or a quota (the previous file untouched) raised as a
    message naming ``shown`` (torch.save reports an OSError as a RuntimeError of that context)."""
    try:
        save_checkpoint(state, path)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(
            f"writing {shown or path} failed ({cause.strerror or cause}); the last good "
            f"checkpoint is kept: free space, then continue with --resume"
        ) from e


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()
    key = torch.from_numpy(key.astype(np.int64))
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    state["numpy"] = [name, key, int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(cuda))


@dataclass
class TrainState:
    """The model being trained (plain, under DDP, or FSDP-sharded), its AdamW and EMA; saves and resumes them.
    ``meta`` is what every checkpoint records besides its position (``model_config``, ``args``, ``data_state``...)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    info: DistInfo
    sharded: bool
    meta: dict[str, Any]

    def _sharded_tensors(self, with_ema: bool) -> tuple[dict[str, Any], dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        tensors = {"model": model_sd, "optim": optim_sd["state"]}
        return tensors | ({"model_ema": self.ema.state} if with_ema else {}), model_sd, optim_sd

    def save(self, paths: Sequence[str], epoch: int, step: int, global_step: int) -> None:
        """Write the state as each of ``paths`` (``.pth`` appended under DDP); every rank calls it."""
        meta = {**self.meta, "scaler": {}, "epoch": epoch, "step": step, "global_step": global_step}
        meta["rng"] = gather_object(_rng_state())
        if self.sharded:
            tensors = self._sharded_tensors(self.ema is not None)[0]
            return _save_sharded(paths, tensors, meta, self.info)

        def write() -> None:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            state |= meta | ({} if self.ema is None else {"model_ema": self.ema.state})
            for path in paths:
                _save(state, path + ".pth")

        on_rank0(write, "while saving the checkpoint", broadcast=False)

    def resume(self, path: str, log: Log) -> tuple[int, int, int]:
        """Restore the state saved at ``path``; returns where to continue: ``(epoch, step, global_step)``."""
        ckpt = self._load(path, log)
        steps_per_epoch = self.meta["steps_per_epoch"]
        epoch, step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        if "step" not in ckpt and "epoch" in ckpt:  # released: 'epoch' is the last finished one
            epoch += 1
        global_step = int(ckpt.get("global_step", epoch * steps_per_epoch + step))
        old, new = ckpt.get("data_state", {}), self.meta["data_state"]
        if old and old != new:
            was = {**new, **old}  # what the checkpoint does not record: as now
            moved = step * int(was["batch_size"]) * int(was["world_size"])
            step = min(steps_per_epoch, moved // (new["batch_size"] * new["world_size"]))
            log(
                f"warning: resuming with another world size / batch size / data / seed than {path} was written with "
                f"({old}); continuing at step {step} of epoch {epoch}, but not bit-exactly"
            )
        if step >= steps_per_epoch:
            epoch, step = epoch + 1, 0
        where = f"epoch {epoch}, step {step} of {steps_per_epoch}, global step {global_step}"
        log(f"resumed from {path}: {where}")
        return epoch, step, global_step

    def _load(self, path: str, log: Log) -> dict[str, Any]:
        if os.path.isdir(path) != self.sharded:
            kind, fix = (
                ("a sharded (--fsdp) checkpoint folder", "add --fsdp")
                if os.path.isdir(path)
                else ("a single-file (DDP) checkpoint", "drop --fsdp")
            )
            raise CheckpointError(f"--resume {path!r} is {kind}; {fix} to continue it")
        source = f"--resume {path!r}"
        if self.sharded:
            from torch.distributed.checkpoint import HuggingFaceStorageReader, load
            from torch.distributed.checkpoint.state_dict import set_state_dict

            ckpt = load_checkpoint(os.path.join(path, STATE_FILE))
            has_ema = self._keep_ema("model_ema" in ckpt.get("sharded", ()), ckpt, path, log)
            tensors, msd, osd = self._sharded_tensors(has_ema)
            load(tensors, storage_reader=HuggingFaceStorageReader(path))
            check_finite({k: v.to_local() for k, v in msd.items()}, source)
            set_state_dict(self.model, self.optimizer, model_state_dict=msd, optim_state_dict=osd)
        else:
            ckpt = load_checkpoint(path)
            check_finite(ckpt["model"], source)
            load_into(self.model, ckpt["model"], source=source)
            self._load_optimizer(ckpt.get("optimizer"), path, log)
            if has_ema := self._keep_ema("model_ema" in ckpt, ckpt, path, log):
                if check_state_dict(self.ema.state, ckpt["model_ema"]) != ([], [], []):
                    raise CheckpointError(
                        f"{source}: its model_ema does not match the model; the file is damaged"
                    )
                for k, v in ckpt["model_ema"].items():
                    self.ema.state[k].copy_(v)
        if self.ema is not None and not has_ema:
            log(f"warning: {path} holds no EMA weights; the EMA starts from the resumed weights")
            self.ema.restart()
        rngs = ckpt.get("rng") or []
        if len(rngs) == self.info.world_size:
            _set_rng_state(rngs[self.info.rank])
        return ckpt

    def _keep_ema(self, saved: bool, ckpt: dict[str, Any], path: str, log: Log) -> bool:
        """Whether the checkpoint's EMA (``saved``) continues: without ``--ema_decay`` it does."""
        if not saved or self.ema is not None:
            return saved and self.ema is not None
        if self.meta["args"].get("ema_decay") is not None:
            log(
                f"warning: --ema_decay 0 drops the EMA weights of {path}; the next checkpoint has none"
            )
            return False
        if not (decay := checkpoint_args(ckpt).get("ema_decay")):
            raise CheckpointError(
                f"{path} holds EMA weights but not their decay: give --ema_decay "
                f"(e.g. 0.9999) to continue them, or --ema_decay 0 to drop them"
            )
        self.ema, self.meta["args"]["ema_decay"] = EMA(self.model, float(decay)), float(decay)
        log(f"the EMA of {path} continues with decay {decay} (--ema_decay 0 would drop it)")
        return True

    def _load_optimizer(self, state: dict[str, Any] | None, path: str, log: Log) -> None:
        """AdamW's state if written for the same parameter groups (not the released order); else a fresh start."""
        groups = self.optimizer.param_groups
        ours = [len(g["params"]) for g in groups]
        theirs = [len(g.get("params", [])) for g in (state or {}).get("param_groups", [])]
        params = [p for g in groups for p in g["params"]]

        def fits(i: Any, st: Mapping[str, Any]) -> bool:  # the moments have the parameter's shape
            big = [v for v in st.values() if torch.is_tensor(v) and v.dim()]
            return int(i) < len(params) and all(v.shape == params[int(i)].shape for v in big)

        saved = (state or {}).get("state", {})
        if state and ours == theirs and all(fits(i, st) for i, st in saved.items()):
            return self.optimizer.load_state_dict(state)
        log(
            f"warning: the optimizer state in {path} is missing or does not match this model's parameter groups "
            f"({theirs} vs {ours} parameters); AdamW starts fresh"
        )


class RunLock:
    """``OUTPUT_DIR/train.lock``, saying who holds it, from start to exit; an ``flock``: the kernel
    releases it when the process dies (SIGKILL, a lost node), so a requeued job finds it free."""

    def __init__(self, folder: str) -> None:
        self.path, since = os.path.join(folder, LOCK_FILE), time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        record |= {"since": since, "job": os.environ.get("SLURM_JOB_ID")}
        warn = f"two trainings into {folder} are not prevented"
        try:
            self.fd = lock_file(self.path, json.dumps(record), warn)
        except BlockingIOError as e:
            raise CheckpointError(
                f"--output_dir {folder} is in use by another training ({str(e) or 'starting'}); wait "
                f"for it to end, stop it, or give another --output_dir"
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


def _ignore_signals(signals: tuple[int, ...], worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    """Set by the preemption signals; the loop then saves and stops at the next step boundary. DataLoader workers
    ignore them (the launcher signals the whole process group) and they are blocked while workers fork."""

    def __init__(self, names: str) -> None:
        self.requested, self._previous, self.signals = False, {}, []
        for name in filter(None, (n.strip().upper() for n in names.split(","))):
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
            if sig is None:
                raise ValueError(f"--preempt_signals: unknown signal {name!r}")
            self.signals.append(sig)
        self.worker_init = functools.partial(_ignore_signals, tuple(int(s) for s in self.signals))

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.requested:
            name = signal.Signals(signum).name
            msg = f"[lpd.train] received {name}: saving the checkpoint at the next step boundary, then exiting\n"
            os.write(2, msg.encode())
        self.requested = True

    def install(self) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                msg = (
                    "train() is not running in the main thread: preemption signals are not handled"
                )
                return warnings.warn(msg, stacklevel=2)

    def iterate(self, loader: torch.utils.data.DataLoader) -> Iterator[Any]:
        """The batches of ``loader``; its workers are shut down when the iteration ends, however it
        ends (they ignore SIGTERM, so the interpreter would otherwise wait for them at exit)."""
        block = self.signals and loader.num_workers > 0 and hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals) if block else None
        try:
            it = iter(loader)
        finally:
            if block:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        try:
            yield from it
        finally:
            getattr(it, "_shutdown_workers", lambda: None)()  # joins them (5 s each at most)
            for w in getattr(it, "_workers", ()):
                if w.is_alive():  # busy beyond that: ended for good
                    w.kill()
                    w.join()

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
