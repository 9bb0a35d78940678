"""The locality-aware order rules read independently of lpd (plain Python, one order at a time, slow).

The rules: step 0 of a blank canvas takes one position at random; every later step (every step when
some positions are known) scores each free position by its selected 8-neighbours (1 per edge
neighbour, 1/sqrt(2) per diagonal one), walks those scoring at least the proximity threshold from the
highest score down, ties in any order, and accepts one unless it lies within Chebyshev distance
<= the repulsion threshold of a position accepted in this step, until the group is full. The rest of
the group is filled by farthest-point sampling over the remaining free positions (Euclidean distance
to the nearest position taken in this step; a random one if there is none yet); equal distances go,
as in the released generator, to a position below the proximity threshold first, then to the higher
score.

:func:`check_order` replays an order and asserts that every step is one these rules allow for some
breaking of ties, and says how each position was picked; :func:`reference_order` draws orders by the
rules with Python's own random numbers (other ties uniformly at random), for statistical comparisons.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

# How a position was picked: the codes of lpd.orders.ORDER_KINDS.
START, PROXIMITY, FARTHEST, RANDOM_FILL, REST = 0, 1, 2, 3, 4


class _Grid:
    def __init__(self, grid: int) -> None:
        self.g, self.n = grid, grid * grid

    def cheb(self, a: int, b: int) -> int:
        return max(abs(a // self.g - b // self.g), abs(a % self.g - b % self.g))

    def d2(self, a: int, b: int) -> int:
        return (a // self.g - b // self.g) ** 2 + (a % self.g - b % self.g) ** 2

    def score(self, c: int, done: set[int]) -> float:
        r, col = divmod(c, self.g)
        edge = diag = 0
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                q = (r + dr) * self.g + col + dc
                if (dr or dc) and 0 <= r + dr < self.g and 0 <= col + dc < self.g and q in done:
                    edge, diag = edge + (dr == 0 or dc == 0), diag + (dr != 0 and dc != 0)
        return edge + diag / math.sqrt(2.0)


def _tie_key(c: int, score: dict[int, float], tp: float) -> tuple[bool, float]:
    """Farthest-point ties: below the proximity threshold first, then the higher score."""
    return score[c] >= tp, -score[c]


def _known_set(known: Sequence[bool] | None, n: int) -> set[int]:
    return set() if known is None else {c for c in range(n) if known[c]}


def check_order(
    order: Sequence[int],
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
    known: Sequence[bool] | None = None,
) -> list[int]:
    """Assert that ``order`` (the unknown positions, raster indices) follows the rules; the kind of every pick."""
    gr, tp, tr = _Grid(grid_size), proximity_threshold, repulsion_threshold
    done = _known_set(known, gr.n)
    order = [int(c) for c in order]
    assert sorted(order) == [c for c in range(gr.n) if c not in done], (
        "not each unknown position once"
    )
    assert sum(group_sizes) == len(order), "the groups do not cover the order"
    kinds: list[int] = []
    s = 0
    for k, g in enumerate(group_sizes):
        step, s = order[s : s + g], s + g
        free = [c for c in range(gr.n) if c not in done]
        score = {c: gr.score(c, done) for c in free}
        if not done:  # a blank canvas: any first position, the rest of the step farthest from it
            accepted, kinds = step[:1], [START]
        else:
            accepted = []  # the longest prefix that a walk can accept
            for c in step:
                if (
                    score[c] < tp
                    or (accepted and score[c] > score[accepted[-1]])
                    or any(gr.cheb(c, a) <= tr for a in accepted)
                ):
                    break
                accepted.append(c)
            for c in (
                free
            ):  # a candidate walked before the walk stopped was set aside by an earlier acceptance
                walked = len(accepted) < g or score[c] > score[accepted[-1]]
                if score[c] >= tp and c not in accepted and walked:
                    assert any(gr.cheb(c, a) <= tr and score[a] >= score[c] for a in accepted), (
                        f"step {k}: candidate {c} (score {score[c]:.3f}) should have been accepted before {step}"
                    )
            kinds += [PROXIMITY] * len(accepted)
        rest = [c for c in free if c not in accepted]
        picks = step[len(accepted) :]
        if len(rest) == len(picks):  # no choice left
            kinds += [REST] * len(picks)
        else:
            far = {c: min((gr.d2(c, a) for a in accepted), default=None) for c in rest}
            for c in picks:
                if far[c] is None:
                    kinds.append(RANDOM_FILL)
                else:
                    best = [r for r, v in far.items() if v == max(far.values())]
                    assert c in best, f"step {k}: fallback pick {c} is not a farthest point"
                    assert _tie_key(c, score, tp) == min(_tie_key(r, score, tp) for r in best), (
                        f"step {k}: fallback pick {c} breaks a tie against the candidate list"
                    )
                    kinds.append(FARTHEST)
                del far[c]
                far = {r: gr.d2(r, c) if v is None else min(v, gr.d2(r, c)) for r, v in far.items()}
        done.update(step)
    return kinds


def reference_order(
    rng: random.Random,
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
    known: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """One order by the rules, drawing from ``rng``; and the kind of every pick."""
    gr, tp, tr = _Grid(grid_size), proximity_threshold, repulsion_threshold
    done = _known_set(known, gr.n)
    order: list[int] = []
    kinds: list[int] = []
    for g in group_sizes:
        free = [c for c in range(gr.n) if c not in done]
        score = {c: gr.score(c, done) for c in free}
        if not done:
            accepted = [rng.choice(free)]
            kinds.append(START)
        else:
            walk = sorted(
                (c for c in free if score[c] >= tp), key=lambda c: (-score[c], rng.random())
            )
            accepted = []
            for c in walk:
                if len(accepted) == g:
                    break
                if all(gr.cheb(c, a) > tr for a in accepted):
                    accepted.append(c)
            kinds += [PROXIMITY] * len(accepted)
        step = list(accepted)
        rest = [c for c in free if c not in accepted]
        if len(rest) == g - len(step):
            rng.shuffle(rest)
            step += rest
            kinds += [REST] * len(rest)
        while len(step) < g:
            if step:
                far = {c: min(gr.d2(c, a) for a in step) for c in rest}
                best = [r for r in rest if far[r] == max(far.values())]
                first = min(_tie_key(r, score, tp) for r in best)
                c = rng.choice([r for r in best if _tie_key(r, score, tp) == first])
            else:
                c = rng.choice(rest)
            kinds.append(FARTHEST if step else RANDOM_FILL)
            step.append(c)
            rest.remove(c)
        order += step
        done.update(step)
    return order, kinds
