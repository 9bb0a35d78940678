"""Order files: the released JSON format (one list of the raster indices ``0..N-1`` in generation order per
image), read with validation and written atomically."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from lpd.files import atomic_write_bytes


class OrderFileError(ValueError):
    """An order file (or array) that is not a list of permutations of ``0..N-1``."""


def _row_problem(row: object, n: int, grid_size: int) -> str | None:
    """What is wrong with one row, or None when it is a permutation of ``0..n-1``."""
    row = row.tolist() if isinstance(row, np.ndarray) else row
    if not isinstance(row, (list, tuple)):
        return f"expected a list of {n} raster indices, got {type(row).__name__}"
    if len(row) != n:
        return f"has {len(row)} entries, expected {n} (one per position of the {grid_size}x{grid_size} token grid)"
    seen: dict[int, int] = {}
    for j, v in enumerate(row):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return f"entry {j} is {v!r}, not an integer raster index"
        if not 0 <= v < n:
            return f"entry {j} is {v}, outside the raster indices 0..{n - 1}"
        if v in seen:
            return f"position {v} appears twice (entries {seen[v]} and {j}); each must appear once"
        seen[v] = j
    return None


def check_order_rows(rows: object, num: int, grid_size: int, source: str = "orders") -> np.ndarray:
    """The first ``num`` of ``rows`` (lists or a 2-D array) as int64, each checked to be a permutation of ``0..N-1``
    (OrderFileError names ``source`` and the first bad or missing row)."""
    n = grid_size * grid_size
    if isinstance(rows, np.ndarray) and rows.ndim != 2:
        raise OrderFileError(f"{source}: expected a 2-D array [num, {n}], got shape {rows.shape}")
    if not isinstance(rows, (list, np.ndarray)):
        raise OrderFileError(
            f"{source}: expected a JSON list of orders (one list of {n} raster indices per image), "
            f"got {type(rows).__name__}"
        )
    if len(rows) < num:
        raise OrderFileError(
            f"{source}: has {len(rows)} orders but {num} are needed (row {len(rows)} is the first "
            f"missing one); generate more with `python -m lpd.orders --num {num} ...`"
        )
    head = rows[:num]
    try:
        arr = np.asarray(head)
    except (ValueError, TypeError):  # ragged or mixed: the row by row check finds the bad row
        arr = np.zeros(0)
    if arr.dtype.kind in "iu" and arr.shape == (num, n):
        bad = np.flatnonzero((np.sort(arr, axis=1) != np.arange(n)).any(axis=1))
        if bad.size == 0:
            return arr.astype(np.int64, copy=False)
        i = int(bad[0])
        raise OrderFileError(f"{source}: row {i}: {_row_problem(head[i], n, grid_size)}")
    for i, row in enumerate(head):
        if (problem := _row_problem(row, n, grid_size)) is not None:
            raise OrderFileError(f"{source}: row {i}: {problem}")
    return np.array([list(r) for r in head], dtype=np.int64).reshape(num, n)  # odd int types


_ALLOWED = b"0123456789, []\n\r\t"  # characters of the usual layout (no '-': negative entries go the slow way)
_ROW = re.compile(rb"\s*\d+(?:\s*,\s*\d+)*\s*")


def _fast_rows(data: bytes, num: int, n: int) -> np.ndarray | None:
    """The first ``num`` rows of a file in json.dump's layout without Python lists; None for any other layout."""
    s = data.strip()
    if num == 0 or data.translate(None, _ALLOWED) or s[:2] != b"[[" or s[-2:] != b"]]":
        return None
    parts = s[2:-2].split(b"], [", num)
    if len(parts) < num:
        return None
    out = np.empty((num, n), dtype=np.int64)
    for i, part in enumerate(parts[:num]):
        if part.count(b",") != n - 1 or not _ROW.fullmatch(part):  # n integers, n - 1 commas
            return None
        out[i] = np.fromstring(part.replace(b",", b" "), dtype=np.int64, sep=" ")
    return out


def load_orders(path: str | os.PathLike, num: int, grid_size: int) -> np.ndarray:
    """The first ``num`` orders of an order file, validated, int64 ``[num, grid_size ** 2]`` (else OrderFileError)."""
    ints = [isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (num, grid_size)]
    if not all(ints) or num < 0 or grid_size < 1:
        raise ValueError(
            f"num and grid_size must be integers >= 0 and >= 1, got {num!r} and {grid_size!r}"
        )
    num, grid_size = int(num), int(grid_size)
    with open(path, "rb") as f:
        data = f.read()
    rows = _fast_rows(data, num, grid_size * grid_size)
    try:
        rows = json.loads(data) if rows is None else rows
    except json.JSONDecodeError as e:
        raise OrderFileError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); an order "
            f"file is a JSON list of lists of raster indices"
        ) from None
    except UnicodeDecodeError as e:
        raise OrderFileError(f"{path}: not a JSON text file ({e})") from None
    return check_order_rows(rows, num, grid_size, source=str(path))


def save_orders(path: str | os.PathLike, orders: np.ndarray) -> None:
    """Write ``orders`` (``[num, N]`` integers) as a JSON order file, atomically (parent folders created)."""
    arr = np.asarray(orders)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise OrderFileError(
            f"orders must be a 2-D integer array [num, N], got {arr.dtype} {arr.shape}"
        )

    def write(f) -> None:  # row by row: no Python list of the whole array
        for i, row in enumerate(arr):
            f.write(((", [" if i else "[[") + ", ".join(map(str, row.tolist())) + "]").encode())
        f.write(b"]" if len(arr) else b"[]")

    atomic_write_bytes(path, write)
