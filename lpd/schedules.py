"""Group-size schedules: how many tokens each decoding step emits.

A schedule ``g_0, ..., g_{K-1}`` splits a generation order of ``N`` positions into ``K`` steps
(all ``g_k > 0``, ``sum(g) == N``).  This module validates schedules wherever they enter the
library and parses the string forms users type on the command line (``"[1]*256"``,
``"[1, 2, 4]"``, ``"1,2,4"``, ``"[1*41, 2*46, 3*41]"``) without ever calling ``eval``.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "parse_group_sizes",
    "validate_group_sizes",
    "GroupSizeError",
    "RELEASED_GROUP_SIZES",
    "num_tokens",
    "cosine_group_sizes",
    "group_sizes",
    "training_schedules",
]


class GroupSizeError(ValueError):
    """A group-size schedule that is malformed or does not fit the token grid."""


_ITEM = re.compile(r"^(\d+)(?:\s*\*\s*(\d+))?$")
MAX_GROUPS = 65536  # a 256 x 256 token grid decoded one token per step


def _check_length(n: int, original: str) -> None:
    if n > MAX_GROUPS:
        raise GroupSizeError(f"group sizes {original[:60]!r}: expands to {n} groups, more than the {MAX_GROUPS} of any "
                             f"token grid; check the repeat counts")


def _parse_items(text: str, original: str) -> list[int]:
    out: list[int] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise GroupSizeError(
                f"group sizes {original!r}: empty entry; write e.g. '1,2,4', '[1, 2, 4]' or '[1]*256'"
            )
        m = _ITEM.match(item)
        if m is None:
            raise GroupSizeError(
                f"group sizes {original!r}: cannot read {item!r}; entries are integers, optionally "
                f"'a*n' for a repeated n times (e.g. '[1*41, 2*46, 3*41]')"
            )
        value, count = int(m.group(1)), int(m.group(2) or 1)
        _check_length(len(out) + count, original)
        out.extend([value] * count)
    return out


def parse_group_sizes(spec: str | Sequence[int], num_tokens: int | None = None) -> list[int]:
    """Parse and validate a group-size schedule.

    Accepts a sequence of ints, or a string: ``"1,2,4"``, ``"[1, 2, 4]"``, ``"[1]*256"``,
    ``"[1]*2 + [2]*3"``, ``"[1*41, 2*46, 3*41]"``.  With ``num_tokens`` the sum is checked too.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise GroupSizeError("group sizes: empty string; write e.g. '1,2,4' or '[1]*256'")
        values: list[int] = []
        # Terms joined by '+': each is '[items]', '[items]*n' or bare items.
        for term in text.split("+"):
            term = term.strip()
            m = re.fullmatch(r"\[(.*)\]\s*(?:\*\s*(\d+))?", term, flags=re.S)
            if m is not None:
                inner = _parse_items(m.group(1), spec)
                _check_length(len(values) + len(inner) * int(m.group(2) or 1), spec)
                values.extend(inner * int(m.group(2) or 1))
            else:
                values.extend(_parse_items(term, spec))
                _check_length(len(values), spec)
        return validate_group_sizes(values, num_tokens)
    return validate_group_sizes(spec, num_tokens)


def validate_group_sizes(group_sizes: Iterable[int], num_tokens: int | None = None) -> list[int]:
    """Return ``group_sizes`` as a list of Python ints, or raise :class:`GroupSizeError`."""
    try:
        sizes = list(group_sizes)
    except TypeError as e:
        raise GroupSizeError(f"group sizes must be a sequence of integers, got {group_sizes!r}") from e
    if not sizes:
        raise GroupSizeError("group sizes: the schedule is empty; it needs at least one group")
    out: list[int] = []
    for i, g in enumerate(sizes):
        if isinstance(g, bool) or not hasattr(g, "__index__"):
            raise GroupSizeError(f"group sizes: entry {i} is {g!r}, not an integer")
        g = int(g.__index__())
        if g <= 0:
            raise GroupSizeError(f"group sizes: entry {i} is {g}; every group must hold at least one token")
        out.append(g)
    if num_tokens is not None and sum(out) != num_tokens:
        raise GroupSizeError(
            f"group sizes sum to {sum(out)} but the token grid has {num_tokens} positions; "
            f"the groups must cover every position exactly once (e.g. '[1]*{num_tokens}')"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Released tables and the project's own cosine schedule
# ---------------------------------------------------------------------------------------------

# The released group-size tables, keyed by the number of tokens ``N`` and the number of steps.
# Written in the compact ``a*n`` form ("a repeated n times") and expanded on import; every table
# sums to ``N`` (checked at import time and by the tests).
_RELEASED_SPECS: dict[int, dict[int, str]] = {
    256: {  # 256 px: 16 x 16 tokens
        256: "[1*256]",
        128: "[1*41, 2*46, 3*41]",
        64: "[1*10, 2*7, 3*7, 4*9, 5*11, 6*20]",
        32: "[1*2, 2*2, 3*2, 4, 5*2, 6*2, 7*2, 8*2, 9*2, 10*3, 11*4, 12*8]",
        24: "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11*2, 12, 13, 14*3, 15*2, 16*3, 17*2]",
        20: "[1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18*2, 19*2, 20*3]",
        16: "[1, 4, 6, 8, 11, 13, 15, 17, 19, 20, 22, 23, 24*3, 25]",
        12: "[1, 7, 11, 15, 19, 22, 25, 28, 30, 32, 33*2]",
        8: "[1, 15, 24, 32, 40, 45, 49, 50]",
    },
    1024: {  # 512 px: 32 x 32 tokens
        1024: "[1*1024]",
        512: "[1*162, 2*188, 3*162]",
        256: "[1*39, 2*28, 3*31, 4*34, 5*44, 6*80]",
        224: "[1*32, 2*21, 3*21, 4*24, 5*27, 6*37, 7*62]",
        192: "[1*22, 2*15, 3*16, 4*16, 5*19, 6*21, 7*27, 8*55, 10]",
        160: "[1*15, 2*11, 3*10, 4*12, 5*12, 6*13, 7*14, 8*17, 9*23, 10*33]",
        128: "[1*10, 2*6, 3*7, 4*7, 5*7, 6*7, 7*8, 8*9, 9*9, 10*11, 11*14, 12*26, 13*7]",
        96: "[1*5, 2*4, 3*4, 4*4, 5*3, 6*4, 7*4, 8*5, 9*4, 10*4, 11*6, 12*5, 13*6, 14*7, 15*8, "
        "16*13, 17*10]",
        80: "[1*4, 2*2, 3*3, 4*2, 5*3, 6*3, 7*2, 8*3, 9*3, 10*3, 11*3, 12*3, 13*3, 14*4, 15*4, "
        "16*4, 17*6, 18*6, 19*7, 20*12]",
        64: "[1*2, 2*2, 3*2, 4, 5*2, 6*2, 7, 8*2, 9*2, 10*2, 11, 12*2, 13*2, 14*2, 15*2, 16*2, "
        "17*2, 18*3, 19*2, 20*3, 21*3, 22*3, 23*5, 24*6, 25*8]",
        56: "[1*2, 2, 3, 4*2, 5, 6, 7, 8*2, 9, 10, 11*2, 12, 13, 14*2, 15, 16*2, 17, 18*2, 19*2, "
        "20, 21*2, 22*2, 23*2, 24*2, 25*3, 26*3, 27*5, 28*6, 29*3]",
        # "1, 2, 3, ..., 22" in the released listing: each of 1..22 once.
        48: "[" + ", ".join(str(v) for v in range(1, 23))
        + ", 23*2, 24, 25, 26*2, 27, 28*2, 29*2, 30*2, 31*2, 32*3, 33*7, 34]",
        40: "[1, 2, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 20, 22, 23, 24, 26, 27, 28, 29, 30, "
        "31, 32, 33, 34, 35*2, 36, 37*2, 38*2, 39*3, 40*4]",
        32: "[1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 29, 31, 33, 35, 36, 38, 40, 41, 42, 44, "
        "45, 46, 47, 48*2, 49*2, 50*3]",
    },
}


def _expand_released() -> dict[int, dict[int, tuple[int, ...]]]:
    tables: dict[int, dict[int, tuple[int, ...]]] = {}
    for n_tokens, by_steps in _RELEASED_SPECS.items():
        tables[n_tokens] = {}
        for steps, spec in by_steps.items():
            sizes = parse_group_sizes(spec, n_tokens)
            if len(sizes) != steps:  # pragma: no cover - guards the table text above
                raise AssertionError(f"released table {n_tokens}/{steps} has {len(sizes)} groups")
            tables[n_tokens][steps] = tuple(sizes)
    return tables


#: Released tables: ``RELEASED_GROUP_SIZES[N][steps]`` is a tuple of group sizes summing to ``N``.
RELEASED_GROUP_SIZES: dict[int, dict[int, tuple[int, ...]]] = _expand_released()


def num_tokens(img_size: int, vqgan_stride: int = 16) -> int:
    """Number of tokens ``N = (img_size / vqgan_stride) ** 2`` of the token grid.

    Raises
    ------
    ValueError
        If the sizes are not positive integers or ``img_size`` is not a multiple of the stride.
    """
    for name, v in (("img_size", img_size), ("vqgan_stride", vqgan_stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if img_size % vqgan_stride:
        raise ValueError(
            f"img_size {img_size} is not a multiple of the tokenizer stride {vqgan_stride}; "
            f"the token grid would not be whole"
        )
    return (img_size // vqgan_stride) ** 2


def cosine_group_sizes(n_tokens: int, steps: int) -> list[int]:
    """The project's own cosine-shaped schedule for ``steps`` groups over ``n_tokens`` positions.

    Step 0 takes one position (except for ``steps == 1``, which must take all ``n_tokens``).
    After step ``j`` about ``N * (1 - cos(pi/2 * (j+1)/steps))`` positions are decoded, the shape
    of the released tables: small groups first, growing and levelling off at the end.  The
    result has exactly ``steps`` groups, every group at least 1, non-decreasing, summing to ``N``.

    Parameters
    ----------
    n_tokens : int
        Number of positions ``N`` (``grid_size ** 2``).
    steps : int
        Number of decoding steps, ``1 <= steps <= n_tokens``.

    Returns
    -------
    list[int]
        The group sizes.

    Raises
    ------
    GroupSizeError
        If ``steps`` is out of range.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise GroupSizeError(f"the token count must be a positive integer, got {n_tokens!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_tokens:
        raise GroupSizeError(
            f"cannot split {n_tokens} positions into {steps!r} steps: the step count must be an "
            f"integer between 1 and {n_tokens} (every step decodes at least one token)"
        )
    if steps == 1:
        return [n_tokens]
    n_rest, k_rest = n_tokens - 1, steps - 1  # step 0 takes exactly one position
    extra = n_rest - k_rest  # tokens beyond the minimum of one per remaining group
    # Share of the extra tokens decoded once step j is done (j = 1..K-1): the cosine curve
    # 1 - cos(pi/2 * (j+1)/K), measured from the end of step 0 and scaled to reach 1 at j = K-1.
    c0 = np.cos(0.5 * np.pi / steps)
    curve = (c0 - np.cos(0.5 * np.pi * np.arange(2, steps + 1) / steps)) / c0
    cum = np.rint(curve * extra).astype(np.int64)
    cum[-1] = extra
    inc = np.diff(np.concatenate([[0], cum]))
    # Rounding can leave a one-token dent; sorting keeps the sum and makes the sizes monotone.
    sizes = [1] + sorted(int(v) + 1 for v in inc)
    return validate_group_sizes(sizes, n_tokens)


def group_sizes(img_size: int, steps: int, vqgan_stride: int = 16) -> list[int]:
    """Group sizes for ``steps`` decoding steps at ``img_size`` pixels.

    Returns the released table when there is one for this token grid and step count
    (:data:`RELEASED_GROUP_SIZES`; 256 px: 8, 12, 16, 20, 24, 32, 64, 128, 256 steps; 512 px:
    32, 40, 48, 56, 64, 80, 96, 128, 160, 192, 224, 256, 512, 1024 steps), and otherwise the
    project's own :func:`cosine_group_sizes`.  Tables are keyed by the number of tokens, so any
    ``img_size`` / ``vqgan_stride`` pair giving a 16 x 16 or 32 x 32 grid uses them.

    Parameters
    ----------
    img_size : int
        Image side in pixels.
    steps : int
        Number of decoding steps, ``1 <= steps <= N``.
    vqgan_stride : int, optional
        Tokenizer down-sampling factor (16 for the LlamaGen VQ tokenizer).

    Returns
    -------
    list[int]
        ``steps`` group sizes summing to ``N = (img_size // vqgan_stride) ** 2``.

    Raises
    ------
    ValueError
        If the grid is not whole or ``steps`` is out of range (:class:`GroupSizeError`).
    """
    n = num_tokens(img_size, vqgan_stride)
    released = RELEASED_GROUP_SIZES.get(n, {}).get(steps)
    if released is not None:
        return list(released)
    return cosine_group_sizes(n, steps)


def training_schedules(img_size: int, vqgan_stride: int = 16) -> list[list[int]]:
    """The schedules one training iteration draws its group sizes from (uniformly).

    This is the list of the released tables for this resolution (nine at 256 px, fourteen at
    512 px), longest schedule (one token per step) first.

    Raises
    ------
    ValueError
        If there are no released tables for this token grid.
    """
    n = num_tokens(img_size, vqgan_stride)
    if n not in RELEASED_GROUP_SIZES:
        known = ", ".join(f"{int(round(k ** 0.5)) * 16} px" for k in RELEASED_GROUP_SIZES)
        raise ValueError(
            f"no released training schedules for a {int(round(n ** 0.5))}x{int(round(n ** 0.5))} "
            f"token grid (img_size {img_size}, stride {vqgan_stride}); they exist for {known} "
            f"with stride 16"
        )
    tables = RELEASED_GROUP_SIZES[n]
    return [list(tables[s]) for s in sorted(tables, reverse=True)]


# ---------------------------------------------------------------------------------------------
# The released JSON files (orders/group_sizes_lookup.json, orders/group_sizes_training/*.json)
# ---------------------------------------------------------------------------------------------

def _json_rows(rows: Sequence[Sequence[int]], indent: str) -> str:
    """One schedule per line, as the released files lay them out (plain JSON either way)."""
    return (",\n").join(indent + "[" + ", ".join(str(int(v)) for v in row) + "]" for row in rows)


def released_files() -> dict[str, str]:
    """The released schedule files, written from this module's tables, by path under ``orders/``.

    ``group_sizes_lookup.json``: ``{"256 resolution": {"256 steps": [...], ...}, "512 resolution": ...}``
    (steps descending); ``group_sizes_training/group_sizes_{256,512}.json``: the list that
    ``--group_sizes_list`` names in the released training scripts (:func:`training_schedules`).
    The released scripts' paths then work unchanged from the repository root.
    """
    files: dict[str, str] = {}
    parts = []
    for n in sorted(RELEASED_GROUP_SIZES):
        res = int(round(n ** 0.5)) * 16
        tables = RELEASED_GROUP_SIZES[n]
        entries = ",\n".join(f'        "{s} steps": [' + ", ".join(map(str, tables[s])) + "]"
                             for s in sorted(tables, reverse=True))
        parts.append(f'    "{res} resolution": {{\n{entries}\n    }}')
        files[f"group_sizes_training/group_sizes_{res}.json"] = (
            "[\n" + _json_rows(training_schedules(res), "    ") + "\n]\n")
    files["group_sizes_lookup.json"] = "{\n" + ",\n".join(parts) + "\n}\n"
    return files


def write_released_files(folder: str) -> list[str]:
    """Write :func:`released_files` under ``folder`` (atomically); returns the paths written."""
    import os

    from lpd.checkpoint import atomic_write_bytes

    written = []
    for rel, text in released_files().items():
        path = os.path.join(folder, rel)
        data = text.encode()
        atomic_write_bytes(path, lambda f, data=data: f.write(data))
        written.append(path)
    return written


if __name__ == "__main__":  # python -m lpd.schedules [FOLDER]: (re)write the released JSON tables
    import sys

    for p in write_released_files(sys.argv[1] if len(sys.argv) > 1 else "orders"):
        print(p)
