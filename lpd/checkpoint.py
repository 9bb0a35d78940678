"""Safe checkpoint I/O: restricted unpickling, strict key checks, atomic writes.

* :func:`load_checkpoint` / :func:`load_state_dict` read a file with
  ``torch.load(..., weights_only=True)``; the only class allowed beyond tensors and containers is
  ``argparse.Namespace``, which the released training code stores under ``'args'``
  (spec section 1).  Nothing else is ever unpickled from a downloaded file.
* :func:`load_into` loads a state dict into a module strictly, with one error that lists every
  missing key, unexpected key and shape mismatch.
* :func:`interpolate_pos_embed` resizes ``pos_embed`` to another token grid (bicubic, slot 0 kept),
  only when a caller asks for it.
* :func:`save_checkpoint` writes atomically (temporary file in the same folder, fsync, rename), so a
  write interrupted mid-way never corrupts an existing checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import tempfile
from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict",
    "check_state_dict",
    "load_into",
    "interpolate_pos_embed",
    "save_checkpoint",
    "atomic_write_bytes",
    "TMP_PREFIX",
    "state_dict_digest",
    "check_finite",
    "check_output_path",
]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a whole checkpoint dict safely (``weights_only=True``, ``argparse.Namespace`` allowed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the reason
        raise CheckpointError(
            f"could not load checkpoint {path!r} with weights_only=True: {e}. The file is truncated, "
            f"not a PyTorch checkpoint, or contains objects other than tensors, containers and "
            f"argparse.Namespace (which lpd refuses to unpickle)."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def _is_state_dict(obj: Mapping[str, Any]) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint: its ``'model'`` entry, or the file itself if it is a bare state dict."""
    obj = load_checkpoint(path, map_location)
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = dict(obj["model"])
    elif _is_state_dict(obj):
        sd = obj
    else:
        raise CheckpointError(
            f"checkpoint {os.fspath(path)!r} has no 'model' entry and is not a bare state dict "
            f"(top-level keys: {sorted(map(str, obj))[:10]})"
        )
    return sd


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches (``"key: checkpoint [..] vs model [..]"``)."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, mismatched


def _format_keys(title: str, keys: list[str], limit: int = 20) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"\n  {title} ({len(keys)}): {shown}"


def load_into(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint", hint: str = ""
) -> None:
    """Strict load of ``state_dict`` into ``module``; one error lists every discrepancy."""
    expected = module.state_dict()
    missing, unexpected, mismatched = check_state_dict(expected, state_dict)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not match the model {type(module).__name__}:"
            + _format_keys("missing keys", missing)
            + _format_keys("unexpected keys", unexpected)
            + _format_keys("shape mismatches", mismatched)
            + (f"\n  {hint}" if hint else "")
        )
    module.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors."""
    bad = sorted(k for k, v in state_dict.items()
                 if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise CheckpointError(f"{source} has non-finite weights (NaN or inf) in {', '.join(bad[:10])}"
                              f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}; the file is damaged or the "
                              f"run diverged: use an earlier checkpoint")


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize ``pos_embed [1, 1 + n, D]`` to ``[1, 1 + num_tokens, D]`` (square grids), bicubic; slot 0 kept."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, 1 + N, D], got {list(pos_embed.shape)}")
    old_n = pos_embed.shape[1] - 1
    old_g, new_g = math.isqrt(old_n), math.isqrt(num_tokens)
    if old_g * old_g != old_n or new_g * new_g != num_tokens:
        raise ValueError(f"pos_embed interpolation needs square grids, got {old_n} -> {num_tokens} positions")
    if old_n == num_tokens:
        return pos_embed
    D = pos_embed.shape[2]
    grid = pos_embed[0, 1:].float().reshape(old_g, old_g, D).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(new_g, new_g), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(1, new_g * new_g, D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: name prefix of the temporary files of :func:`atomic_write_bytes` (left behind only by a killed
#: process; a resumed evaluation sweeps them up)
TMP_PREFIX = ".tmp-"


def atomic_write_bytes(path: str | os.PathLike, write_fn, fsync: bool = True) -> None:
    """Call ``write_fn(fileobj)`` on a temporary file next to ``path``, fsync it, then rename over ``path``.

    Readers (and reruns) see the old file or the new one, never a partial one; the temporary file is
    named ``.tmp-<name>-*`` and removed on failure.  ``fsync=False`` skips the flushes to disk (for
    many small files whose readability a rerun checks anyway).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        _fsync_dir(folder)


def state_dict_digest(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes: equal digests, equal weights."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def check_output_path(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written (a folder, or no writable folder to create it in), else None."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give the path of a file to write (it may lie inside that folder)"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # missing folders are created on writing
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{flag} {path}: {folder} is a file, not a folder; choose another path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {folder} is not writable; choose another path"
    return None


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` written atomically: readers see the old file or the new one, never a partial one."""
    atomic_write_bytes(path, lambda f: torch.save(dict(obj), f))
