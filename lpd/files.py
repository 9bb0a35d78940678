"""Files: checkpoints read safely (``weights_only=True``), strict key checks, atomic writes, locks.

Imports no other lpd module.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

TMP_PREFIX = ".tmp-"  # temporary files of atomic_write_bytes (left only by a killed process)
LOCK_NAME = ".lock"  # the lock file of lock_folder
STATE_FILE = "state.pth"  # the non-tensor part of a sharded checkpoint
EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint dict read with ``weights_only=True``; a sharded folder: its whole weights."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return read_sharded(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        reason = (found.group(1) if found else first).strip()
        raise CheckpointError(
            f"could not load checkpoint {path!r} with weights_only=True ({reason}). The file is "
            f"truncated, not a PyTorch checkpoint, or contains objects other than tensors, "
            f"containers and argparse.Namespace (which lpd refuses to unpickle)."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def checkpoint_args(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's training ``args`` (a Namespace or a dict) as a dict."""
    args = ckpt.get("args")
    return vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})


def read_sharded(path: str) -> dict[str, Any]:
    """A sharded checkpoint folder as one checkpoint: whole ``model`` (and ``model_ema``) tensors
    and its ``state.pth``, without AdamW's moments. Needs no process group."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise CheckpointError(
            f"{path!r} is a folder but not a sharded checkpoint (no {STATE_FILE}); give a "
            f"checkpoint file, a checkpoint folder written by main_train.py --fsdp, or an exported "
            f"model folder"
        )
    meta = load_checkpoint(os.path.join(path, STATE_FILE))
    groups = [g for g in meta.get("sharded", ()) if g in ("model", "model_ema")]
    try:
        index = HuggingFaceStorageReader(path).read_metadata().state_dict_metadata
        index = {k: m for k, m in index.items() if k.split(".", 1)[0] in groups}
        flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in index.items()}
        with warnings.catch_warnings():  # "no process group: loading in one process" is meant
            warnings.simplefilter("ignore")
            load(flat, storage_reader=HuggingFaceStorageReader(path), no_dist=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the folder and the reason
        raise CheckpointError(f"could not read the sharded checkpoint {path!r}: {e}") from e
    out: dict[str, Any] = {**meta, **{g: {} for g in groups}}
    for key, t in flat.items():
        group, name = key.split(".", 1)
        out[group][name] = t
    return out


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint (its ``'model'``, or a bare state dict) or of an export."""
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        return read_export(os.fspath(path))[1]
    obj = load_checkpoint(path, map_location)
    if isinstance(obj.get("model"), Mapping):
        return dict(obj["model"])
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise CheckpointError(
        f"checkpoint {os.fspath(path)!r} has no 'model' entry and is not a bare state dict "
        f"(top-level keys: {sorted(map(str, obj))[:10]})"
    )


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing and unexpected keys, shape mismatches (``"key: checkpoint [..] vs model [..]"``)."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, mismatched


def load_into(
    module: torch.nn.Module, state_dict: Mapping, source="checkpoint", hint="", assign=False
) -> None:
    """Strict load (``assign``: the tensors become the parameters); one error lists every fault."""
    titles = ("missing keys", "unexpected keys", "shape mismatches")
    faults = zip(titles, check_state_dict(module.state_dict(), state_dict))
    listed = "".join(
        f"\n  {t} ({len(k)}): {_some(k, 20, ', ... ({} more)')}" for t, k in faults if k
    )
    if listed:
        name, hint = type(module).__name__, f"\n  {hint}" if hint else ""
        raise CheckpointError(f"{source} does not match the model {name}:{listed}{hint}")
    module.load_state_dict(state_dict, strict=True, assign=assign)


def _some(items: Sequence[str], limit: int, more: str) -> str:
    """The first ``limit`` of ``items``, joined, then ``more`` with the count of the rest."""
    rest = more.format(len(items) - limit) if len(items) > limit else ""
    return ", ".join(items[:limit]) + rest


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors."""
    bad = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if bad := sorted(k for k in bad if not bool(torch.isfinite(state_dict[k]).all())):
        raise CheckpointError(
            f"{source} has non-finite weights (NaN or inf) in {_some(bad, 10, ' and {} more')}; the "
            f"file is damaged or the run diverged: use an earlier checkpoint"
        )


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    os.umask(mask := os.umask(0))
    return mask


def temp_dir_for(path: str) -> str:
    """A new temporary folder beside ``path`` (renamed to it later), plain folder permissions."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, write_fn, fsync: bool = True) -> None:
    """Call ``write_fn(fileobj)`` on a temporary file next to ``path``, fsync it, rename it over
    ``path``; ``fsync=False`` skips the flushes (for many small files a rerun checks anyway)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what a plain open() would
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, os.fspath(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(folder)


def state_dict_digest(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes: same digest, same data."""
    state = state.state_dict() if isinstance(state, torch.nn.Module) else state
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        if isinstance(t, torch.Tensor):
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
            h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after links; existing files are compared by inode)."""
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


def check_output_path(
    path: str, flag: str, inputs: Sequence[tuple[str, Any]] = (), overwrite=False, ours: Any = None
) -> str | None:
    """Why ``path`` cannot be written: a folder, no writable folder to create it in, one of
    ``inputs`` (``(flag, path)`` pairs: an output is never an input) or an existing file that
    ``ours(path)`` does not recognise as written by lpd (without ``overwrite``); else None."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give the path of a file to write (it may lie in it)"
    for in_flag, src in inputs:
        if src is not None and same_file(path, src):
            return (
                f"{flag} {path} is also {in_flag} {src}: an output is never an input; "
                f"choose another path"
            )
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # missing folders are created on writing
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{flag} {path}: {folder} is a file, not a folder; choose another path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {folder} is not writable; choose another path"
    if os.path.lexists(path) and not overwrite and not (ours and ours(path)):
        by = " and was not written by lpd" if ours else ""
        return f"{flag} {path} exists{by}; choose another name, or --overwrite to replace it"
    return None


def lock_file(path: str, record: str, warn: str = "") -> int | None:
    """Hold ``path`` for this process (an ``flock``: released when it ends, even killed) and write
    ``record`` into it: the descriptor to close; None without file locks (warning, if ``warn``
    says what is then not prevented); BlockingIOError(the holder's record) while another holds it."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(holder) from None
            if warn:  # no locks on this file system
                warnings.warn(f"cannot lock {path} ({e.strerror}): {warn}", stacklevel=3)
            return None
        with contextlib.suppress(FileNotFoundError):  # deleted by its holder while we waited
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)  # then take the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, record.encode(), 0)
    return fd


def lock_folder(folder: str) -> int | None:
    """:func:`lock_file` of ``folder/.lock``, recording this process; BlockingIOError when held."""
    try:
        return lock_file(os.path.join(folder, LOCK_NAME), f"{os.getpid()} on {os.uname().nodename}")
    except BlockingIOError as e:
        raise BlockingIOError(f"{folder} is in use by process {str(e) or '(unknown)'}") from None


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` written atomically."""
    atomic_write_bytes(path, lambda f: torch.save(dict(obj), f))


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder ``tmp`` to ``path``; one there stays as ``path.old`` until then."""
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def export_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of an exported model folder."""
    path = os.path.join(folder, EXPORT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_config"), dict):
        raise CheckpointError(f"{path} has no model_config mapping: it is not an lpd export")
    return config


def read_export(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and ``model.safetensors`` weights of an export (reading runs no code)."""
    from safetensors.torch import load_file

    config = export_config(folder)
    try:
        return config, load_file(os.path.join(folder, EXPORT_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
        raise CheckpointError(f"could not read {os.path.join(folder, EXPORT_WEIGHTS)}: {e}") from e
