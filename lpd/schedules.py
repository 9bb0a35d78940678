"""Group-size schedules: how many tokens each decoding step emits.

A schedule ``g_0, ..., g_{K-1}`` splits a generation order of ``N`` positions into ``K`` steps
(all ``g_k > 0``, ``sum(g) == N``).  This module validates schedules wherever they enter the
library and parses the string forms users type on the command line (``"[1]*256"``,
``"[1, 2, 4]"``, ``"1,2,4"``, ``"[1*41, 2*46, 3*41]"``) without ever calling ``eval``.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["parse_group_sizes", "validate_group_sizes", "GroupSizeError"]


class GroupSizeError(ValueError):
    """A group-size schedule that is malformed or does not fit the token grid."""


_ITEM = re.compile(r"^(\d+)(?:\s*\*\s*(\d+))?$")


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
                values.extend(inner * int(m.group(2) or 1))
            else:
                values.extend(_parse_items(term, spec))
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
