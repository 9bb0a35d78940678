"""Order files: the released JSON format, read with validation and written atomically.

An order file is a JSON list with one entry per image; each entry is a list of the ``N`` raster
indices ``0..N-1`` in generation order (``N = grid_size ** 2``).  This is the format of the
released ``lpd_orders`` files, so those load unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["load_orders", "save_orders", "OrderFileError", "check_order_rows"]


class OrderFileError(ValueError):
    """An order file (or array) that is not a list of permutations of ``0..N-1``."""


def _row_problem(row: object, n: int, grid_size: int) -> str | None:
    """What is wrong with one row, or None when it is a permutation of ``0..n-1``."""
    if not isinstance(row, (list, tuple, np.ndarray)):
        return f"expected a list of {n} raster indices, got {type(row).__name__}"
    if len(row) != n:
        return (
            f"has {len(row)} entries, expected {n} (one per position of the "
            f"{grid_size}x{grid_size} token grid)"
        )
    seen: dict[int, int] = {}
    for j, v in enumerate(row):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            return f"entry {j} is {v!r}, not an integer raster index"
        v = int(v)
        if not 0 <= v < n:
            return f"entry {j} is {v}, outside the raster indices 0..{n - 1}"
        if v in seen:
            return f"position {v} appears twice (entries {seen[v]} and {j}); each must appear once"
        seen[v] = j
    return None


def check_order_rows(rows: object, num: int, grid_size: int, source: str = "orders") -> np.ndarray:
    """Validate ``rows`` (a list of lists, or an array) and return the first ``num`` as int64.

    Raises
    ------
    OrderFileError
        Naming the first bad row and what is wrong with it, or saying how many rows are missing.
    """
    n = grid_size * grid_size
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2:
            raise OrderFileError(f"{source}: expected a 2-D array [num, {n}], got shape {rows.shape}")
        rows_seq: object = rows
    elif isinstance(rows, list):
        rows_seq = rows
    else:
        raise OrderFileError(
            f"{source}: expected a JSON list of orders (one list of {n} raster indices per "
            f"image), got {type(rows).__name__}"
        )
    total = len(rows_seq)  # type: ignore[arg-type]
    if total < num:
        raise OrderFileError(
            f"{source}: has {total} orders but {num} are needed (row {total} is the first "
            f"missing one); generate more with `python -m lpd.orders --num {num} ...`"
        )
    head = rows_seq[:num]  # type: ignore[index]
    arr = None
    try:
        arr = np.asarray(head)
    except (ValueError, TypeError):
        arr = None  # ragged or mixed: find the bad row below
    if arr is not None and arr.dtype.kind in "iu" and arr.shape == (num, n):
        # A row is a permutation of 0..n-1 exactly when its sorted copy is 0..n-1.
        bad_rows = np.flatnonzero((np.sort(arr, axis=1) != np.arange(n, dtype=arr.dtype)).any(axis=1))
        if bad_rows.size == 0:
            return arr.astype(np.int64, copy=False)
        first = int(bad_rows[0])
        row = head[first]
        row = row.tolist() if isinstance(row, np.ndarray) else row
        raise OrderFileError(f"{source}: row {first}: {_row_problem(row, n, grid_size)}")
    for i in range(num):
        row = head[i]
        if isinstance(row, np.ndarray):
            row = row.tolist()
        problem = _row_problem(row, n, grid_size)
        if problem is not None:
            raise OrderFileError(f"{source}: row {i}: {problem}")
    # Every row passed the slow check: only an odd element type (e.g. a numpy scalar) is left.
    return np.array([list(r) for r in head], dtype=np.int64).reshape(num, n)


# Characters of an order file in the usual layout (no '-': negative entries go the slow way).
_ALLOWED = b"0123456789, []\n\r\t"
_COMMA_TO_SPACE = bytes.maketrans(b",", b" ")


def _fast_rows(data: bytes, num: int, n: int) -> np.ndarray | None:
    """The first ``num`` rows of a file in the layout json.dump and :func:`save_orders` write
    (``[[a, b, ...], [c, ...], ...]``, integers separated by ``", "``), parsed without building
    Python lists; None when the file looks any different, and the caller then parses it with
    :mod:`json` and reports exactly what is wrong.  Rows are not yet checked to be permutations;
    rows after ``num`` are not read.

    Each row must hold exactly ``n - 1`` commas and read as exactly ``n`` whitespace-separated
    integers once its commas are spaces: an empty field (``", ,"``) or a missing comma changes
    one of the two counts, so such rows fall back to the exact parser.
    """
    if num == 0 or data.translate(None, _ALLOWED):
        return None
    s = data.strip()
    if not (s.startswith(b"[[") and s.endswith(b"]]")):
        return None
    parts = s[2:-2].split(b"], [", num)
    if len(parts) < num:
        return None
    out = np.empty((num, n), dtype=np.int64)
    for i in range(num):
        part = parts[i]
        if part.count(b",") != n - 1 or b"[" in part or b"]" in part:
            return None
        try:  # np.fromstring's text mode; leftover characters make it raise
            row = np.fromstring(part.translate(_COMMA_TO_SPACE), dtype=np.int64, sep=" ")
        except ValueError:
            return None
        if row.size != n:
            return None
        out[i] = row
    return out


def load_orders(path: str | os.PathLike, num: int, grid_size: int) -> np.ndarray:
    """Read and validate an order file; return its first ``num`` orders.

    Parameters
    ----------
    path : path-like
        A JSON file: a list of orders, each a list of the raster indices ``0..N-1``.
    num : int
        Number of orders needed; the file must hold at least this many.
    grid_size : int
        Side of the token grid (``N = grid_size ** 2``).

    Returns
    -------
    np.ndarray
        int64 ``[num, grid_size ** 2]``.

    Files in the layout ``json.dump`` and :func:`save_orders` write are read without building
    Python lists (a 50,000-order 512 px file in seconds); any other layout goes through
    :mod:`json`.  Rows after the first ``num`` are not checked.

    Raises
    ------
    OrderFileError
        For a file that is not valid JSON, not a list, too short, or has a row that is not a
        permutation of ``0..N-1`` (the message names the first bad row and what is wrong).
    FileNotFoundError
        If the file does not exist.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 0:
        raise ValueError(f"num must be an integer >= 0, got {num!r}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, (int, np.integer)) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    path = Path(path)
    n = int(grid_size) * int(grid_size)
    with open(path, "rb") as f:
        data = f.read()
    fast = _fast_rows(data, int(num), n)
    if fast is not None:
        return check_order_rows(fast, int(num), int(grid_size), source=str(path))
    try:
        rows = json.loads(data)
    except json.JSONDecodeError as e:
        raise OrderFileError(
            f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); an order "
            f"file is a JSON list of lists of raster indices"
        ) from e
    except UnicodeDecodeError as e:
        raise OrderFileError(f"{path}: not a JSON text file ({e})") from e
    return check_order_rows(rows, int(num), int(grid_size), source=str(path))


def save_orders(path: str | os.PathLike, orders: np.ndarray) -> None:
    """Write ``orders`` (``[num, N]`` integers) as a JSON order file, atomically.

    The file is written to a temporary file in the same directory, flushed to disk and then
    renamed over ``path``, so a reader never sees a half-written file.  Parent directories are
    created as needed.
    """
    arr = np.asarray(orders)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise OrderFileError(f"orders must be a 2-D integer array [num, N], got {arr.dtype} {arr.shape}")
    from lpd.checkpoint import atomic_write_bytes

    def write(f) -> None:
        f.write(b"[")
        for i in range(arr.shape[0]):  # row by row: no Python list of the whole array
            if i:
                f.write(b", ")
            f.write(("[" + ", ".join(map(str, arr[i].tolist())) + "]").encode("ascii"))
        f.write(b"]")

    atomic_write_bytes(path, write)
