"""A plain, one-order-at-a-time transcription of the locality-aware order rules (slow, pure Python).

It draws the same random numbers and breaks ties the same way as :func:`lpd.orders.lpd_orders`, so
the two must agree exactly; the tests and ``benchmarks/bench_orders.py --check`` compare them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lpd.orders.generate import (
    _CODE_RANK,
    _CODE_VALUE,
    _INV_SQRT2,
    _SALT_FILL,
    _SALT_START,
    _TIE_RND_SHIFT,
    KIND_FARTHEST,
    KIND_PROXIMITY,
    KIND_RANDOM_FILL,
    KIND_REST,
    KIND_START,
    _order_keys,
    _position_random,
    _splitmix64,
    _step_keys,
    _uniform_index,
)


def lpd_order_reference(i: int, seed: int, group_sizes: Sequence[int], grid_size: int,
                        proximity_threshold: float = 1.0, repulsion_threshold: float = 1.0,
                        known: Sequence[bool] | None = None) -> tuple[list[int], list[int]]:
    """Order ``i`` of a run (the unknown positions only, with a ``known`` mask [N]) and how each was picked."""
    g_, n = grid_size, grid_size * grid_size
    okey = _order_keys(seed, np.array([i]))
    pos = [(c // g_, c % g_) for c in range(n)]
    known_set = set() if known is None else {c for c in range(n) if known[c]}

    def cheb(a: int, b: int) -> int:
        return max(abs(pos[a][0] - pos[b][0]), abs(pos[a][1] - pos[b][1]))

    def d2(a: int, b: int) -> int:
        return (pos[a][0] - pos[b][0]) ** 2 + (pos[a][1] - pos[b][1]) ** 2

    def fill(step_key, rnd, group: dict, accepted: list[int], rest: list[int], need: int) -> list[tuple[int, int]]:
        # Farthest-point sampling over the candidate list `rest`.
        if len(rest) <= need:  # no choice left: all of them, in candidate-list order
            return [(c, KIND_REST) for c in rest]
        # Ties between equal distances: candidate-list group (score), then the top bits of the
        # position's random number, then the smaller raster index.
        tie_order = sorted(rest, key=lambda c: (group[c], -(int(rnd[c]) >> _TIE_RND_SHIFT), c))
        tie_rank = {c: j for j, c in enumerate(tie_order)}
        taken: list[tuple[int, int]] = []
        pts, rest = list(accepted), list(rest)
        if not pts:
            h = _position_random(_step_keys(step_key, 0, _SALT_FILL), n)[0]
            c = max(rest, key=lambda c: (int(h[c]), -c))
            taken.append((c, KIND_RANDOM_FILL))
            pts.append(c)
            rest.remove(c)
        while len(taken) < need:
            c = max(rest, key=lambda c: (min(d2(c, p) for p in pts), -tie_rank[c]))
            rest.remove(c)
            taken.append((c, KIND_FARTHEST))
            pts.append(c)
        return taken

    order: list[int] = []
    kinds: list[int] = []
    first_step = 0
    if not known_set:  # step 0: one uniformly random position, the rest of step 0 by the fallback
        order = [int(_uniform_index(_splitmix64(okey ^ np.uint64(_SALT_START)), n)[0])]
        kinds, first_step = [KIND_START], 1
        if group_sizes[0] > 1:
            step_key = _step_keys(okey, 0)
            rnd = _position_random(step_key, n)[0]
            rest = sorted((c for c in range(n) if c != order[0]), key=lambda c: (-int(rnd[c]), c))
            g0 = (int(_CODE_VALUE[0] >= proximity_threshold) << 5) | int(_CODE_RANK[0])
            for c, kd in fill(step_key, rnd, dict.fromkeys(rest, g0), order[:1], rest, group_sizes[0] - 1):
                order.append(c)
                kinds.append(kd)
    for k in range(first_step, len(group_sizes)):
        g = group_sizes[k]
        step_key = _step_keys(okey, k)
        rnd = _position_random(step_key, n)[0]
        done = known_set | set(order)
        score, group = {}, {}
        for c in range(n):
            if c in done:
                continue
            edge = sum(1 for p in done if d2(c, p) == 1)
            diag = sum(1 for p in done if d2(c, p) == 2)
            score[c] = edge + diag * _INV_SQRT2
            # Candidate-list group: score >= τp after the others, higher scores first.
            group[c] = (int(score[c] >= proximity_threshold) << 5) | int(_CODE_RANK[5 * edge + diag])
        ranked = sorted(score, key=lambda c: (-score[c], -int(rnd[c]), c))
        high = [c for c in ranked if score[c] >= proximity_threshold]
        low = [c for c in ranked if score[c] < proximity_threshold]
        accepted: list[int] = []
        set_aside: list[int] = []
        walked = 0
        for c in high:
            if len(accepted) == g:
                break
            walked += 1
            if any(cheb(c, a) <= repulsion_threshold for a in accepted):
                set_aside.append(c)
            else:
                accepted.append(c)
        order += accepted
        kinds += [KIND_PROXIMITY] * len(accepted)
        if len(accepted) < g:
            rest = low + set_aside + high[walked:]
            for c, kd in fill(step_key, rnd, group, accepted, rest, g - len(accepted)):
                order.append(c)
                kinds.append(kd)
    return order, kinds
