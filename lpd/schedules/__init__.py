"""Group-size schedules ``g_0 .. g_{K-1}`` (tokens per decoding step, each >= 1): the released
tables, the cosine fallback, and a parser (no ``eval``) of ``"1,2,4"``, ``"[1, 2, 4]"``,
``"[1]*256"``, ``"[1]*2 + [2]*3"``, ``"[1*41, 2*46, 3*41]"``."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["parse_group_sizes", "validate_group_sizes", "GroupSizeError", "RELEASED_GROUP_SIZES"]
__all__ += ["num_tokens", "cosine_group_sizes", "group_sizes", "scaled_group_sizes"]
__all__ += ["training_schedules"]


class GroupSizeError(ValueError):
    """A group-size schedule that is malformed or does not fit the token grid."""


_ITEM = re.compile(r"(\d+)(?:\s*\*\s*(\d+))?")
_TERM = re.compile(r"\[(.*)\]\s*(?:\*\s*(\d+))?", flags=re.S)
MAX_GROUPS = 65536  # a 256 x 256 token grid decoded one token per step


def _check_length(n: int, original: str) -> None:
    if n > MAX_GROUPS:
        raise GroupSizeError(
            f"group sizes {original[:60]!r}: expands to {n} groups, more than the {MAX_GROUPS} of "
            f"any token grid; check the repeat counts"
        )


def _parse_items(text: str, original: str, before: int) -> list[int]:
    """Comma-separated ``a`` or ``a*n`` items (``before`` groups already parsed)."""
    out: list[int] = []
    for item in (raw.strip() for raw in text.split(",")):
        if (m := _ITEM.fullmatch(item)) is None:
            raise GroupSizeError(
                f"group sizes {original!r}: empty entry; write e.g. '1,2,4', '[1, 2, 4]' or '[1]*256'"
                if not item
                else f"group sizes {original!r}: cannot read {item!r}; entries are integers, "
                f"optionally 'a*n' for a repeated n times (e.g. '[1*41, 2*46, 3*41]')"
            )
        _check_length(before + len(out) + int(m[2] or 1), original)
        out += [int(m[1])] * int(m[2] or 1)
    return out


def parse_group_sizes(spec: str | Sequence[int], num_tokens: int | None = None) -> list[int]:
    """A validated schedule from a string (the forms above) or a sequence."""
    if not isinstance(spec, str):
        return validate_group_sizes(spec, num_tokens)
    if not spec.strip():
        raise GroupSizeError("group sizes: empty string; write e.g. '1,2,4' or '[1]*256'")
    values: list[int] = []
    for term in spec.split("+"):
        m = _TERM.fullmatch(term.strip())  # "[items] * times", or plain items
        inner = _parse_items(term if m is None else m.group(1), spec, len(values))
        times = 1 if m is None else int(m.group(2) or 1)
        _check_length(len(values) + len(inner) * times, spec)
        values += inner * times
    return validate_group_sizes(values, num_tokens)


def validate_group_sizes(group_sizes: Iterable[int], num_tokens: int | None = None) -> list[int]:
    """``group_sizes`` as a list of Python ints (each >= 1, summing to ``num_tokens`` if given)."""
    try:
        sizes = list(group_sizes)
    except TypeError:
        raise GroupSizeError(
            f"group sizes must be a sequence of integers, got {group_sizes!r}"
        ) from None
    if not sizes:
        raise GroupSizeError("group sizes: the schedule is empty; it needs at least one group")
    for i, g in enumerate(sizes):
        if isinstance(g, bool) or not hasattr(g, "__index__"):
            raise GroupSizeError(f"group sizes: entry {i} is {g!r}, not an integer")
        if g.__index__() <= 0:
            raise GroupSizeError(
                f"group sizes: entry {i} is {g}; every group must hold at least one token"
            )
    out = [int(g.__index__()) for g in sizes]
    if num_tokens is not None and sum(out) != num_tokens:
        raise GroupSizeError(
            f"group sizes sum to {sum(out)} but the token grid has {num_tokens} positions; the "
            f"groups must cover every position exactly once (e.g. '[1]*{num_tokens}')"
        )
    return out


# The released tables by token count N and step count, ``a*n`` = ``a`` repeated ``n`` times.
_RELEASED_SPECS: dict[int, dict[int, str]] = {
    256: {  # 256 px: 16 x 16 tokens
        256: "1*256",
        128: "1*41, 2*46, 3*41",
        64: "1*10, 2*7, 3*7, 4*9, 5*11, 6*20",
        32: "1*2, 2*2, 3*2, 4, 5*2, 6*2, 7*2, 8*2, 9*2, 10*3, 11*4, 12*8",
        24: "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11*2, 12, 13, 14*3, 15*2, 16*3, 17*2",
        20: "1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, 18*2, 19*2, 20*3",
        16: "1, 4, 6, 8, 11, 13, 15, 17, 19, 20, 22, 23, 24*3, 25",
        12: "1, 7, 11, 15, 19, 22, 25, 28, 30, 32, 33*2",
        8: "1, 15, 24, 32, 40, 45, 49, 50",
    },
    1024: {  # 512 px: 32 x 32 tokens
        1024: "1*1024",
        512: "1*162, 2*188, 3*162",
        256: "1*39, 2*28, 3*31, 4*34, 5*44, 6*80",
        224: "1*32, 2*21, 3*21, 4*24, 5*27, 6*37, 7*62",
        192: "1*22, 2*15, 3*16, 4*16, 5*19, 6*21, 7*27, 8*55, 10",
        160: "1*15, 2*11, 3*10, 4*12, 5*12, 6*13, 7*14, 8*17, 9*23, 10*33",
        128: "1*10, 2*6, 3*7, 4*7, 5*7, 6*7, 7*8, 8*9, 9*9, 10*11, 11*14, 12*26, 13*7",
        96: "1*5, 2*4, 3*4, 4*4, 5*3, 6*4, 7*4, 8*5, 9*4, 10*4, 11*6, 12*5, 13*6, 14*7, 15*8, 16*13, 17*10",
        80: "1*4, 2*2, 3*3, 4*2, 5*3, 6*3, 7*2, 8*3, 9*3, 10*3, 11*3, 12*3, 13*3, 14*4, 15*4, 16*4, 17*6, 18*6, 19*7, "
        "20*12",
        64: "1*2, 2*2, 3*2, 4, 5*2, 6*2, 7, 8*2, 9*2, 10*2, 11, 12*2, 13*2, 14*2, 15*2, 16*2, 17*2, 18*3, 19*2, 20*3, "
        "21*3, 22*3, 23*5, 24*6, 25*8",
        56: "1*2, 2, 3, 4*2, 5, 6, 7, 8*2, 9, 10, 11*2, 12, 13, 14*2, 15, 16*2, 17, 18*2, 19*2, 20, 21*2, 22*2, 23*2, "
        "24*2, 25*3, 26*3, 27*5, 28*6, 29*3",
        48: "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23*2, 24, 25, 26*2, 27, "
        "28*2, 29*2, 30*2, 31*2, 32*3, 33*7, 34",
        40: "1, 2, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 20, 22, 23, 24, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35*2, "
        "36, 37*2, 38*2, 39*3, 40*4",
        32: "1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 29, 31, 33, 35, 36, 38, 40, 41, 42, 44, 45, 46, 47, 48*2, "
        "49*2, 50*3",
    },
}

#: ``RELEASED_GROUP_SIZES[N][steps]``: the released group sizes (a tuple summing to ``N``).
RELEASED_GROUP_SIZES: dict[int, dict[int, tuple[int, ...]]] = {
    n: {s: tuple(parse_group_sizes(spec, n)) for s, spec in tables.items()}
    for n, tables in _RELEASED_SPECS.items()
}


def num_tokens(img_size: int, vqgan_stride: int = 16) -> int:
    """``N = (img_size / vqgan_stride) ** 2``, the positions of the token grid."""
    for name, v in (("img_size", img_size), ("vqgan_stride", vqgan_stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if img_size % vqgan_stride:
        raise ValueError(
            f"img_size {img_size} is not a multiple of the tokenizer stride {vqgan_stride}; "
            f"the token grid would not be whole"
        )
    return (img_size // vqgan_stride) ** 2


def _check_steps(steps: int, n: int, what: str, flag: str = "the step count") -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n:
        raise GroupSizeError(
            f"cannot split {n} {what} into {steps!r} steps: {flag} must be an integer between 1 "
            f"and {n} (every step decodes at least one token)"
        )


def cosine_group_sizes(n_tokens: int, steps: int) -> list[int]:
    """About ``N (1 - cos(pi/2 (j+1)/K))`` decoded after step ``j``; step 0 takes one."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise GroupSizeError(f"the token count must be a positive integer, got {n_tokens!r}")
    _check_steps(steps, n_tokens, "positions")
    if steps == 1:
        return [n_tokens]
    extra = n_tokens - steps  # tokens beyond one per group
    # Share of the extra tokens decoded once step j (1..K-1) is done, from the end of step 0.
    c0 = np.cos(0.5 * np.pi / steps)
    cum = np.rint((c0 - np.cos(0.5 * np.pi * np.arange(2, steps + 1) / steps)) / c0 * extra)
    cum = cum.astype(np.int64)
    cum[-1] = extra
    # Rounding can leave a one-token dent; sorting keeps the sum and makes the sizes monotone.
    return validate_group_sizes([1] + sorted(int(v) + 1 for v in np.diff(cum, prepend=0)), n_tokens)


def group_sizes(img_size: int, steps: int, vqgan_stride: int = 16) -> list[int]:
    """``steps`` group sizes at ``img_size`` px: the released table, else cosine."""
    n = num_tokens(img_size, vqgan_stride)
    released = RELEASED_GROUP_SIZES.get(n, {}).get(steps)
    return list(released) if released is not None else cosine_group_sizes(n, steps)


def scaled_group_sizes(
    n_unknown: int, steps: int, img_size: int, vqgan_stride: int = 16
) -> list[int]:
    """Group sizes for ``n_unknown`` positions of an ``img_size`` px grid in ``steps`` steps: the
    released table scaled (cumulative shares rounded, every group >= 1), else cosine."""
    n = num_tokens(img_size, vqgan_stride)
    if isinstance(n_unknown, bool) or not isinstance(n_unknown, int) or not 1 <= n_unknown <= n:
        raise GroupSizeError(
            f"{n_unknown!r} unknown positions: the token grid of {img_size} px has 1 to {n}"
        )
    _check_steps(steps, n_unknown, "unknown positions", "--steps")
    table = RELEASED_GROUP_SIZES.get(n, {}).get(steps)
    if table is None:
        return cosine_group_sizes(n_unknown, steps)
    j = np.arange(steps)
    cum = np.rint(np.cumsum(table) * n_unknown / n).astype(np.int64)
    cum = np.clip(cum, j + 1, n_unknown - steps + 1 + j)
    cum = np.maximum.accumulate(cum - j) + j  # strictly increasing: every group >= 1
    return validate_group_sizes(np.diff(cum, prepend=0).tolist(), n_unknown)


def training_schedules(img_size: int, vqgan_stride: int = 16) -> list[list[int]]:
    """The released tables of this resolution, longest first (training draws one uniformly)."""
    n = num_tokens(img_size, vqgan_stride)
    if n not in RELEASED_GROUP_SIZES:
        g = int(round(n**0.5))
        known = ", ".join(f"{int(round(k**0.5)) * 16} px" for k in RELEASED_GROUP_SIZES)
        raise ValueError(
            f"no released training schedules for a {g}x{g} token grid (img_size {img_size}, stride "
            f"{vqgan_stride}); they exist for {known} with stride 16"
        )
    return [list(t) for _, t in sorted(RELEASED_GROUP_SIZES[n].items(), reverse=True)]


def released_files() -> dict[str, str]:
    """The released ``orders/`` schedule files' text by path (lookup and training tables)."""
    files, parts = {}, []
    for n, tables in sorted(RELEASED_GROUP_SIZES.items()):
        res = int(round(n**0.5)) * 16
        entries = ",\n".join(
            f'        "{s} steps": {json.dumps(tables[s])}' for s in sorted(tables, reverse=True)
        )
        parts.append(f'    "{res} resolution": {{\n{entries}\n    }}')
        rows = ",\n".join("    " + json.dumps(t) for t in training_schedules(res))
        files[f"group_sizes_training/group_sizes_{res}.json"] = f"[\n{rows}\n]\n"
    files["group_sizes_lookup.json"] = "{\n" + ",\n".join(parts) + "\n}\n"
    return files
