"""Locality-aware orders: structure, determinism, statistics, files, the command line and pictures."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
from orders_reference import check_order, reference_order
from PIL import Image

from lpd.orders import (
    RELEASED_STATISTICS,
    OrderFileError,
    group_sizes,
    load_orders,
    lpd_orders,
    order_statistics,
    random_orders,
    raster_orders,
    save_orders,
)
from lpd.orders.cli import main as cli_main
from lpd.orders.generate import KIND_FARTHEST, KIND_PROXIMITY, KIND_START, lpd_batch
from lpd.schedules import GroupSizeError, cosine_group_sizes, scaled_group_sizes

G256 = group_sizes(256, 20)


def _kinds(num, sizes, grid, tp, tr, seed=0, known=None):
    return lpd_batch(np.arange(num), seed, sizes, grid, tp, tr, return_kinds=True, known=known)


def _groups(sizes):
    s = 0
    for k, g in enumerate(sizes):
        yield k, s, s + g
        s += g


def _cheb(grid, a, b):
    return max(abs(a // grid - b // grid), abs(a % grid - b % grid))


def _d2(grid, a, b):
    return (a // grid - b // grid) ** 2 + (a % grid - b % grid) ** 2


# ---------------------------------------------------------------------------------------------
# Structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, grid, tp, tr",
    [
        (G256, 16, 1.0, 2.0),
        (group_sizes(256, 8), 16, 1.0, 3.0),
        ([1] * 25, 5, 1.0, 1.0),
        ([1, 3, 5, 7], 4, 0.0, 0.0),
    ],
)
def test_rows_are_permutations(sizes, grid, tp, tr):
    n = grid * grid
    made = (
        lpd_orders(40, sizes, grid, tp, tr, seed=1),
        random_orders(40, grid, seed=1),
        raster_orders(3, grid),
    )
    for o in made:
        assert o.dtype == np.int64 and o.shape[1] == n
        assert (np.sort(o, axis=1) == np.arange(n)).all()


def test_step_zero_takes_one_uniform_position():
    o, kinds = _kinds(600, G256, 16, 1.0, 2.0)
    assert (kinds[:, 0] == KIND_START).all()
    assert (kinds[:, 1:] != KIND_START).all()
    # The first position is spread over the grid (uniform: ~230 distinct out of 256 expected).
    assert len(np.unique(o[:, 0])) > 180


def test_proximity_picks_respect_repulsion_and_come_first():
    for tr in (1.0, 2.0, 3.0):
        o, kinds = _kinds(25, G256, 16, 1.0, tr, seed=7)
        for b in range(len(o)):
            for _k, s0, s1 in _groups(G256):
                kd = kinds[b, s0:s1]
                # Proximity picks first, then fallback picks.
                assert (np.diff((kd != KIND_PROXIMITY).astype(int)) >= 0).all()
                prox = o[b, s0:s1][kd == KIND_PROXIMITY]
                for i in range(len(prox)):
                    for j in range(i):
                        assert _cheb(16, prox[i], prox[j]) > tr


def test_proximity_picks_have_enough_support():
    # A proximity pick has a score >= τp from positions decoded in earlier steps.
    for tp in (1.0, 1.5):
        o, kinds = _kinds(6, G256, 16, tp, 2.0, seed=3)
        for b in range(len(o)):
            done = set()
            for _k, s0, s1 in _groups(G256):
                for p, kd in zip(o[b, s0:s1], kinds[b, s0:s1]):
                    if kd == KIND_PROXIMITY:
                        score = sum(
                            1 / math.sqrt(_d2(16, p, q)) for q in done if _cheb(16, p, q) == 1
                        )
                        assert score >= tp - 1e-9
                done.update(o[b, s0:s1].tolist())


@pytest.mark.parametrize("tr", [1.0, 2.0])
def test_close_pairs_only_when_the_fallback_had_to(tr):
    """A fallback pick is a farthest-point pick; it lands within τr of an earlier pick of its
    step only when every remaining position was that close to one (for τr <= 2, where the
    Euclidean farthest point is never closer in Chebyshev distance than a free position)."""
    grid, sizes = 16, G256
    o, kinds = _kinds(10, sizes, grid, 1.0, tr, seed=11)
    n = grid * grid
    for b in range(len(o)):
        done: set[int] = set()
        for _k, s0, s1 in _groups(sizes):
            step: list[int] = []
            for p, kd in zip(o[b, s0:s1].tolist(), kinds[b, s0:s1].tolist()):
                if kd == KIND_FARTHEST:
                    rest = [c for c in range(n) if c not in done and c not in step]
                    best = max(min(_d2(grid, c, q) for q in step) for c in rest)
                    assert min(_d2(grid, p, q) for q in step) == best  # a farthest point
                    if any(_cheb(grid, p, q) <= tr for q in step):
                        assert all(any(_cheb(grid, c, q) <= tr for q in step) for c in rest)
                step.append(p)
            done.update(step)


@pytest.mark.parametrize(
    "sizes, grid, tp, tr",
    [
        (cosine_group_sizes(64, 8), 8, 1.0, 1.0),
        (cosine_group_sizes(64, 5), 8, 0.5, 3.0),
        (cosine_group_sizes(64, 5), 8, 3.0, 1.0),  # few proximity candidates
        (cosine_group_sizes(64, 5), 8, 9.0, 1.0),  # none: random fallback starts
        (cosine_group_sizes(64, 5), 8, 0.0, 1.5),  # every position is a candidate
        ([3, 5, 8, 10, 10, 28], 8, 1.0, 2.0),  # first group larger than one
        (G256, 16, 1.0, 2.0),
    ],
)
def test_every_step_follows_the_rules_of_the_plain_reference(sizes, grid, tp, tr):
    o, kinds = _kinds(3, sizes, grid, tp, tr, seed=5)
    for i in range(3):
        assert check_order(o[i], sizes, grid, tp, tr) == kinds[i].tolist()


@pytest.mark.parametrize("box_table, share", [(23, 4), (0, 4), (23, 1), (0, 1000)])
def test_large_grid_path_equals_the_small_grid_path(monkeypatch, box_table, share):
    # Grids above 32 x 32 use int64 fallback keys, computed distances, box updates (distances from
    # a table or computed; share 1: boxes up to the whole grid, 1000: the whole grid always) and
    # grid-row maxima: force that path on a small grid (and drop the cached grid tables around it).
    from lpd.orders import generate

    known = _masks("hole", 16, 2)
    cases = [
        (G256, 1.0, 2.0, None),
        (cosine_group_sizes(256, 6), 9.0, 1.0, None),
        (scaled_group_sizes(int((~known[0]).sum()), 12, 256), 1.0, 2.0, known),
    ]
    small = [lpd_orders(2, sizes, 16, tp, tr, seed=2, known=k) for sizes, tp, tr, k in cases]
    monkeypatch.setattr(generate, "_TABLE_MAX_N", 0)
    monkeypatch.setattr(generate, "_INT32_KEY_MAX_G", 0)
    monkeypatch.setattr(generate, "_BOX_TABLE_MAX", box_table)
    monkeypatch.setattr(generate, "_WINDOW_SHARE", share)
    generate._grid.cache_clear()
    try:
        for (sizes, tp, tr, k), want in zip(cases, small):
            o = lpd_orders(2, sizes, 16, tp, tr, seed=2, known=k)
            assert np.array_equal(o, want)
            for i in range(2):
                check_order(o[i], sizes, 16, tp, tr, known=None if k is None else k[i])
    finally:
        generate._grid.cache_clear()


# ---------------------------------------------------------------------------------------------
# Known positions (zero-shot editing: prefilled tokens, only the others are ordered)
# ---------------------------------------------------------------------------------------------


def _masks(kind, grid, num, seed=0):
    """bool [num, grid**2], True = known; every row leaves the same number of positions unknown."""
    rng = np.random.default_rng(seed)
    n = grid * grid
    r, c = np.divmod(np.arange(n), grid)
    known = np.ones((num, n), dtype=bool)
    for b in range(num):
        if kind == "hole":  # a square hole of side grid / 2 at a random place (inpainting)
            y, x = rng.integers(0, grid - grid // 2 + 1, size=2)
            known[b] = ~((r >= y) & (r < y + grid // 2) & (c >= x) & (c < x + grid // 2))
        elif kind == "single":  # one unknown token
            known[b, rng.integers(n)] = False
        elif kind == "half":  # the lower half known
            known[b] = r >= grid // 2
        elif kind == "border":  # the border ring unknown (outpainting)
            known[b] = (r > 0) & (r < grid - 1) & (c > 0) & (c < grid - 1)
        else:  # scattered: a random third of the positions unknown
            known[b, rng.choice(n, n // 3, replace=False)] = False
    return known


@pytest.mark.parametrize("kind", ["hole", "single", "half", "border", "scatter"])
@pytest.mark.parametrize(
    "steps, tp, tr", [(5, 1.0, 1.0), (3, 1.0, 2.0), (4, 0.0, 1.5), (3, 9.0, 1.0), (7, 0.5, 3.0)]
)
def test_known_positions_follow_the_rules_of_the_plain_reference(kind, steps, tp, tr):
    known = _masks(kind, 8, 3, seed=steps)
    m = int((~known[0]).sum())
    sizes = cosine_group_sizes(m, min(steps, m))
    o, kinds = _kinds(3, sizes, 8, tp, tr, seed=9, known=known)
    assert o.shape == (3, m)
    for i in range(3):
        assert check_order(o[i], sizes, 8, tp, tr, known=known[i]) == kinds[i].tolist()


@pytest.mark.parametrize("kind", ["hole", "border"])
def test_known_positions_follow_the_rules_at_256px(kind):
    known = _masks(kind, 16, 2, seed=1)
    sizes = scaled_group_sizes(int((~known[0]).sum()), 20, 256)
    o = lpd_orders(2, sizes, 16, 1.0, 2.0, seed=3, known=known)
    for i in range(2):
        check_order(o[i], sizes, 16, 1.0, 2.0, known=known[i])


def test_known_rows_depend_only_on_seed_index_and_mask():
    known = _masks("scatter", 16, 10, seed=2)
    m = int((~known[0]).sum())
    sizes = scaled_group_sizes(m, 16, 256)
    full = lpd_orders(10, sizes, 16, 1.0, 2.0, seed=4, known=known)
    assert full.shape == (10, m) and full.dtype == np.int64
    for row, k in zip(full, known):  # the unknown positions, each once; never a known one
        assert sorted(row.tolist()) == np.flatnonzero(~k).tolist()
    assert np.array_equal(
        full[6:], lpd_orders(4, sizes, 16, 1.0, 2.0, seed=4, start=6, known=known[6:])
    )
    assert np.array_equal(
        full, lpd_orders(10, sizes, 16, 1.0, 2.0, seed=4, batch_size=3, known=known)
    )
    assert np.array_equal(
        full[[7, 2]],
        lpd_orders(2, sizes, 16, 1.0, 2.0, seed=4, indices=[7, 2], known=known[[7, 2]]),
    )
    one = lpd_orders(
        3, sizes, 16, 1.0, 2.0, seed=4, known=known[0]
    )  # a [N] mask holds for every row
    assert np.array_equal(one[0], full[0]) and not np.array_equal(one[1], one[0])
    # Random orders of the unknown positions: the run's random orders with the known positions left out.
    r = random_orders(10, 16, seed=4, known=known)
    plain = random_orders(10, 16, seed=4)
    for row, p, k in zip(r, plain, known):
        assert row.tolist() == [int(v) for v in p if not k[v]]
    assert np.array_equal(r[6:], random_orders(4, 16, seed=4, start=6, known=known[6:]))


def test_without_known_the_orders_are_those_made_before_it_existed():
    """Digests of orders generated before ``known`` was added: order files regenerate bit for bit."""
    import hashlib

    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]

    assert digest(lpd_orders(64, G256, 16, 1.0, 2.0, seed=0)) == "cf921dad1e7e4757"
    assert digest(lpd_orders(8, group_sizes(512, 48), 32, 1.0, 4.0, seed=1)) == "a0877f08eb0d53a4"
    assert digest(lpd_orders(16, [3, 5, 8, 10, 10, 28], 8, 1.0, 2.0, seed=5)) == "ce1327b1cbca2449"
    assert (
        digest(lpd_orders(16, group_sizes(256, 8), 16, 9.0, 1.0, seed=2**64 - 1, start=1000))
        == "64c9415e1e06784b"
    )
    assert digest(random_orders(16, 16, seed=3)) == "f43d62a9fe4ae171"
    nothing = np.zeros((64, 256), dtype=bool)  # nothing known: the same orders
    assert digest(lpd_orders(64, G256, 16, 1.0, 2.0, seed=0, known=nothing)) == "cf921dad1e7e4757"
    assert digest(random_orders(16, 16, seed=3, known=nothing[:16])) == "f43d62a9fe4ae171"


def test_64x64_orders_are_those_of_the_plain_large_grid_path():
    """Digests of 64 x 64 orders made before the box updates: the fast fallback is exact."""
    import hashlib

    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()[:16]

    c64, c32 = cosine_group_sizes(4096, 64), cosine_group_sizes(4096, 32)
    assert digest(lpd_orders(6, c64, 64, 1.0, 8.0, seed=3)) == "fbb2130f9b074e6e"
    assert digest(lpd_orders(6, c32, 64, 1.0, 4.0, seed=3)) == "e8a687ab913c802d"
    known = np.arange(4096) >= 2048
    half = lpd_orders(4, scaled_group_sizes(2048, 48, 1024), 64, 1.0, 8.0, seed=1, known=known)
    assert digest(half) == "674d5c69c30d7f6e"
    c40 = cosine_group_sizes(48 * 48, 40)
    assert digest(lpd_orders(8, c40, 48, 1.0, 6.0, seed=1)) == "192edf1f458aa007"


@pytest.mark.parametrize(
    "sizes, tr, least",
    [
        (scaled_group_sizes(128, 20, 256), 2.0, 0.99),
        ([8] + [10] * 12, 2.0, 0.5),
        ([8] + [10] * 12, 1.0, 0.8),
    ],
)
def test_first_step_starts_next_to_the_known_region(sizes, tr, least):
    """16 x 16, lower half known: 16 of the 128 unknown positions (row 7) touch it, so random picks land there
    12.5% of the time. LPD's first step: every pick when it takes one position (measured 100%); 58% of 8 picks
    with τr = 2 (row 7 holds 4-6 picks three columns apart, the rest go far by the fallback), 89% with τr = 1."""
    known = np.arange(256) >= 128
    touching = np.zeros(256, dtype=bool)
    touching[112:128] = True
    o = lpd_orders(400, sizes, 16, 1.0, tr, seed=0, known=known)
    r = random_orders(400, 16, seed=0, known=known)
    assert (
        o.shape == r.shape == (400, 128) and o.max() < 128 and r.max() < 128
    )  # no known position returned
    assert touching[o[:, : sizes[0]]].mean() >= least
    assert 0.09 <= touching[r[:, : sizes[0]]].mean() <= 0.16


@pytest.mark.parametrize(
    "known, sizes, exc, match",
    [
        (np.zeros(256, dtype=np.int64), G256, ValueError, "known must be a bool array"),
        (
            np.zeros((3, 256), dtype=bool),
            G256,
            ValueError,
            r"known must be a bool array \[256\] or \[2, 256\]",
        ),
        (np.arange(256) >= 128, G256, GroupSizeError, "sum to 256 but 128 positions are not known"),
        (np.ones(256, dtype=bool), [1], ValueError, "nothing is left"),
    ],
)
def test_bad_known_masks(known, sizes, exc, match):
    with pytest.raises(exc, match=match):
        lpd_orders(2, sizes, 16, known=known)


def test_known_rows_with_different_counts_are_refused():
    known = np.zeros((3, 256), dtype=bool)
    known[0, :10], known[1, :10], known[2, :12] = True, True, True
    for make in (
        lambda: lpd_orders(3, [1] * 246, 16, known=known),
        lambda: random_orders(3, 16, known=known),
    ):
        with pytest.raises(
            ValueError, match="row 2 leaves 244 positions unknown but row 0 leaves 246"
        ):
            make()


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_row_depends_only_on_seed_and_index():
    full = lpd_orders(10, G256, 16, 1.0, 2.0, seed=42)
    assert np.array_equal(full[5:], lpd_orders(5, G256, 16, 1.0, 2.0, seed=42, start=5))
    assert np.array_equal(full[3:4], lpd_orders(1, G256, 16, 1.0, 2.0, seed=42, start=3))
    assert np.array_equal(full, lpd_orders(10, G256, 16, 1.0, 2.0, seed=42, batch_size=3))
    assert np.array_equal(full, lpd_orders(10, G256, 16, 1.0, 2.0, seed=42))
    other = lpd_orders(10, G256, 16, 1.0, 2.0, seed=43)
    assert (full != other).any(axis=1).all()
    assert len({tuple(r) for r in full.tolist()}) == 10
    r = random_orders(10, 16, seed=42)
    assert np.array_equal(r[4:], random_orders(6, 16, seed=42, start=4))
    assert not np.array_equal(r, random_orders(10, 16, seed=1))


def test_extreme_thresholds():
    # τr beyond the grid: at most one proximity pick per step; τp beyond any score: only the
    # farthest-point fallback (starting from a random position each step).
    for tp, tr in [(1.0, 100.0), (float("inf"), 2.0), (1.0, float("inf"))]:
        o, kinds = _kinds(4, group_sizes(256, 8), 16, tp, tr)
        assert (np.sort(o, axis=1) == np.arange(256)).all()
        for _k, s0, s1 in _groups(group_sizes(256, 8)):
            assert (kinds[:, s0:s1] == KIND_PROXIMITY).sum(axis=1).max() <= (
                1 if tr > 15 else s1 - s0
            )
        if tp == float("inf"):
            assert not (kinds == KIND_PROXIMITY).any()
    check_order(
        lpd_orders(1, group_sizes(256, 8), 16, 1.0, 100.0)[0], group_sizes(256, 8), 16, 1.0, 100.0
    )


def test_empty_and_single():
    assert lpd_orders(0, G256, 16).shape == (0, 256)
    assert lpd_orders(1, [1], 1).tolist() == [[0]]
    assert lpd_orders(2, [1, 1, 1, 1], 2).shape == (2, 4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(group_sizes=[1, 2, 3]), GroupSizeError, "sum"),
        (dict(group_sizes=[1, 0, 255]), GroupSizeError, "at least one"),
        (dict(repulsion_threshold=-1.0), ValueError, "repulsion_threshold"),
        (dict(proximity_threshold=-0.5), ValueError, "proximity_threshold"),
        (dict(proximity_threshold=float("nan")), ValueError, "proximity_threshold"),
        (dict(num=-1), ValueError, "num"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(start=-2), ValueError, "start"),
        (dict(grid_size=0), ValueError, "grid_size"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = dict(num=2, group_sizes=G256, grid_size=16)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lpd_orders(**args)


# ---------------------------------------------------------------------------------------------
# Statistics against the released generator's
# ---------------------------------------------------------------------------------------------


def _close(ours, ref):
    assert abs(ours["context_support"] - ref["context_support"]) <= 0.02 * ref["context_support"], (
        ours
    )
    assert abs(ours["group_spread"] - ref["group_spread"]) <= 0.04 * ref["group_spread"], ours
    assert abs(ours["close_pairs"] - ref["close_pairs"]) <= 0.01, ours


def test_statistics_match_released_256():
    o = lpd_orders(300, G256, 16, 1.0, 2.0, seed=0)
    _close(order_statistics(o, G256, 16, 2.0), RELEASED_STATISTICS["256/20 tau_r=2"])


def test_statistics_match_released_512():
    sizes = group_sizes(512, 48)
    o = lpd_orders(60, sizes, 32, 1.0, 4.0, seed=0)
    _close(order_statistics(o, sizes, 32, 4.0), RELEASED_STATISTICS["512/48 tau_r=4"])


def test_statistics_of_random_orders():
    o = random_orders(300, 16, seed=0)
    _close(order_statistics(o, G256, 16, 2.0), RELEASED_STATISTICS["random 256/20 tau_r=2"])


@pytest.mark.parametrize(
    "sizes, tp, tr", [(cosine_group_sizes(64, 8), 1.0, 1.0), (cosine_group_sizes(64, 5), 1.0, 2.0)]
)
def test_statistics_match_the_plain_reference(sizes, tp, tr):
    """The same rules drawing from Python's random numbers instead of lpd's hash: each statistic's
    mean over 300 orders within 4 standard errors of the reference's."""
    num, rng = 300, random.Random(0)
    ref = [reference_order(rng, sizes, 8, tp, tr) for _ in range(num)]
    ours, kinds = _kinds(num, sizes, 8, tp, tr)

    def per_order(orders, kinds):
        rows = [order_statistics(np.asarray(o)[None], sizes, 8, tr) for o in orders]
        return {
            **{key: np.array([r[key] for r in rows]) for key in rows[0]},
            "proximity picks": (np.asarray(kinds) == KIND_PROXIMITY).mean(axis=1),
        }

    a, b = per_order([o for o, _ in ref], [k for _, k in ref]), per_order(ours, kinds)
    for key in a:
        se = math.sqrt((a[key].var() + b[key].var()) / num)
        assert abs(a[key].mean() - b[key].mean()) <= 4 * se, (key, a[key].mean(), b[key].mean(), se)


def test_ties_between_the_best_candidates_are_broken_at_random():
    """Step 1, one position, from an interior start: each of the 4 edge neighbours about 1/4 of the time."""
    o = lpd_orders(4000, [1] * 64, 8, 1.0, 1.0, seed=0)
    r0, c0, r1, c1 = o[:, 0] // 8, o[:, 0] % 8, o[:, 1] // 8, o[:, 1] % 8
    inner = (r0 > 0) & (r0 < 7) & (c0 > 0) & (c0 < 7)
    moves = list(zip((r1 - r0)[inner].tolist(), (c1 - c0)[inner].tolist()))
    n = len(moves)
    for move in ((-1, 0), (1, 0), (0, -1), (0, 1)):  # binomial(n, 1/4): 6 standard deviations
        assert abs(moves.count(move) - n / 4) <= 6 * math.sqrt(n * 3 / 16), (
            move,
            moves.count(move),
            n,
        )


def test_the_rule_check_is_not_vacuous():
    sizes = cosine_group_sizes(64, 8)
    o, kinds = _kinds(1, sizes, 8, 1.0, 1.0, seed=3)
    order = o[0].tolist()
    assert check_order(order, sizes, 8, 1.0, 1.0) == kinds[0].tolist()
    late = len(order) - 1
    for i in np.flatnonzero(kinds[0] == KIND_PROXIMITY)[
        :5
    ]:  # a proximity pick swapped with the last position
        bad = list(order)
        bad[i], bad[late] = bad[late], bad[i]
        with pytest.raises(AssertionError):
            check_order(bad, sizes, 8, 1.0, 1.0)
    with pytest.raises(AssertionError, match="once"):
        check_order(order[:-1] + order[:1], sizes, 8, 1.0, 1.0)


def test_statistics_by_hand():
    # Raster order of a 3 x 3 grid, one token per step.
    st = order_statistics(raster_orders(1, 3), [1] * 9, 3, 1.0)
    # Earlier neighbours in raster order: 1, 1, 2, 4, 3, 2, 4, 3 for positions 1..8.
    assert st["context_support"] == pytest.approx(20 / 8)
    assert math.isnan(st["group_spread"]) and math.isnan(st["close_pairs"])
    st = order_statistics(np.array([[0, 2, 6, 8, 1, 3, 4, 5, 7]]), [4, 5], 3, 1.0)
    assert st["group_spread"] == pytest.approx((2 + 1) / 2)
    assert st["close_pairs"] == pytest.approx((0 + 8) / (6 + 10))


# ---------------------------------------------------------------------------------------------
# Order files
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    o = lpd_orders(7, G256, 16, 1.0, 2.0)
    path = tmp_path / "sub" / "orders.json"
    save_orders(path, o)
    assert os.listdir(path.parent) == ["orders.json"]  # no temporary file left
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # like a plain open()
    rows = json.loads(path.read_text())
    assert rows == o.tolist()  # the released format: a JSON list of lists
    assert np.array_equal(load_orders(path, 7, 16), o)
    assert np.array_equal(load_orders(path, 3, 16), o[:3])


@pytest.mark.parametrize(
    "content, num, match",
    [
        ('{"orders": []}', 1, "expected a JSON list"),
        ("[[0, 1, 2, 3], [0, 1, 2]]", 2, r"row 1: has 3 entries, expected 4"),
        ("[[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 1, 3]]", 3, r"row 2: position 1 appears twice"),
        ("[[0, 1, 2, 4]]", 1, r"row 0: entry 3 is 4, outside"),
        ("[[0, 1, 2, 3], [0, 1, 2, -1]]", 2, r"row 1: entry 3 is -1, outside"),
        ("[[0, 1, 2, 3]]", 2, r"has 1 orders but 2 are needed \(row 1 is the first missing"),
        ("[[0, 1, 2, 3], [0, 1, 2, 3.5]]", 2, r"row 1: entry 3 is 3.5, not an integer"),
        ('[[0, 1, 2, 3], "0123"]', 2, r"row 1: expected a list"),
        ("[[0, 1, 2, 3], [0, 1, 2, true]]", 2, r"row 1: entry 3 is True"),
        ("[[0, 1, 2, 3]", 1, "not valid JSON"),
        ("", 1, "not valid JSON"),
    ],
)
def test_bad_order_files(tmp_path, content, num, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(OrderFileError, match=match):
        load_orders(path, num, 2)


def test_usual_layout_is_read_without_json_and_others_with_it(tmp_path, monkeypatch):
    from lpd.orders import files

    o = lpd_orders(5, group_sizes(256, 8), 16, 1.0, 2.0)
    plain, spaced = tmp_path / "plain.json", tmp_path / "spaced.json"
    plain.write_text(json.dumps(o.tolist()))  # json.dump's layout: ", " between numbers
    spaced.write_text(json.dumps(o.tolist(), indent=1))
    calls = []
    real = files.json.loads
    monkeypatch.setattr(files.json, "loads", lambda data: calls.append(1) or real(data))
    assert np.array_equal(load_orders(plain, 5, 16), o) and not calls
    assert np.array_equal(load_orders(spaced, 5, 16), o) and calls


@pytest.mark.parametrize(
    "content, match",
    [
        ("[[0, 1, 2, 3], [0, 1, , 3]]", "not valid JSON"),  # an empty field is not a 0
        ("[[0, 1, 2, 3], [0, 1, 2 3]]", "not valid JSON"),
        ("[[0, 1, 2, 3], [0, 1, 2, 3,]]", "not valid JSON"),
        ("[[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]", "row 1: has 6 entries"),
        ("[[0, 1, 2, 3], [[0, 1], 2, 3]]", "row 1: has 3 entries"),
        ("[[0, 1, 2, 3], [[0], 1, 2, 3]]", r"row 1: entry 0 is \[0\], not an integer"),
    ],
)
def test_near_miss_layouts_are_refused(tmp_path, content, match):
    path = tmp_path / "near.json"
    path.write_text(content)
    with pytest.raises(OrderFileError, match=match):
        load_orders(path, 2, 2)


def test_bad_rows_beyond_num_are_not_read(tmp_path):
    path = tmp_path / "o.json"
    path.write_text("[[0, 1, 2, 3], [0, 0, 0, 0]]")
    assert load_orders(path, 1, 2).tolist() == [[0, 1, 2, 3]]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_orders(tmp_path / "nope.json", 1, 2)


# ---------------------------------------------------------------------------------------------
# Command line and pictures
# ---------------------------------------------------------------------------------------------


def test_cli_writes_the_same_orders_as_the_api(tmp_path):
    out = tmp_path / "o.json"
    args = [
        "--img_size",
        "256",
        "--generation_steps",
        "20",
        "--repulsion_threshold",
        "2.0",
        "--num",
        "12",
        "--seed",
        "3",
        "--output_file",
        str(out),
        "--no_progress",
    ]
    assert cli_main(args + ["--workers", "1", "--chunk_size", "5"]) == 0
    expected = lpd_orders(12, G256, 16, 1.0, 2.0, seed=3)
    assert np.array_equal(load_orders(out, 12, 16), expected)
    out2 = tmp_path / "o2.json"
    cli_main(
        [
            "--num",
            "4",
            "--start",
            "8",
            "--seed",
            "3",
            "--repulsion_threshold",
            "2",
            "--output_file",
            str(out2),
            "--no_progress",
            "--workers",
            "1",
        ]
    )
    assert np.array_equal(load_orders(out2, 4, 16), expected[8:])
    out3 = tmp_path / "r.json"
    cli_main(
        [
            "--order",
            "random",
            "--num",
            "3",
            "--group_sizes",
            "[1]*256",
            "--output_file",
            str(out3),
            "--no_progress",
            "--workers",
            "1",
        ]
    )
    assert np.array_equal(load_orders(out3, 3, 16), random_orders(3, 16, seed=0))


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert cli_main(["--group_sizes", "[1, 2]", "--output_file", str(tmp_path / "x.json")]) == 2
    assert "sum to 3" in capsys.readouterr().err
    assert cli_main(["--repulsion_threshold", "-1", "--output_file", str(tmp_path / "x.json")]) == 2
    assert "--repulsion_threshold" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.fixture
def nothing_drawn(monkeypatch):
    """Fail the test if the command line generates or draws any order."""
    from lpd.orders import cli, visualize

    def never(*a, **k):
        raise AssertionError("an order was made before the arguments were checked")

    for module, name in (
        (cli, "generate"),
        (cli, "lpd_batch"),
        (cli, "random_orders"),
        (cli, "load_orders"),
        (visualize, "render_order"),
    ):
        monkeypatch.setattr(module, name, never)


def _refused(capsys, argv, *names):
    assert cli_main(argv + ["--no_progress"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.err.startswith("error: ")
        and captured.err.count("\n") == 1
        and "Traceback" not in captured.err
    )
    for name in names:
        assert name in captured.err, captured.err


def test_cli_refuses_unusable_output_files_before_generating(tmp_path, capsys, nothing_drawn):
    (tmp_path / "plain.txt").write_text("x")
    _refused(
        capsys,
        ["--num", "4", "--output_file", str(tmp_path)],
        "--output_file",
        str(tmp_path),
        "folder",
    )
    _refused(
        capsys,
        ["--num", "4", "--output_file", str(tmp_path / "plain.txt" / "o.json")],
        "--output_file",
        "not a folder",
    )
    _refused(
        capsys, ["--num", "4", "--output_file", str(tmp_path / "o.png")], "--output_file", ".json"
    )
    _refused(
        capsys, ["--visualize", "--output_file", str(tmp_path / "o.json")], "--output_file", ".png"
    )
    (tmp_path / "dir.png").mkdir()
    _refused(
        capsys,
        ["--visualize", "--output_file", str(tmp_path / "dir.png")],
        "--output_file",
        "folder",
    )
    assert sorted(os.listdir(tmp_path)) == ["dir.png", "plain.txt"] and not os.listdir(
        tmp_path / "dir.png"
    )


def test_cli_never_replaces_a_file_it_did_not_write(tmp_path, capsys, nothing_drawn):
    orders, photo = tmp_path / "released.json", tmp_path / "photo.png"
    orders.write_text("[[0]]")
    Image.new("RGB", (4, 4)).save(photo)
    before = orders.read_bytes(), photo.read_bytes()
    _refused(
        capsys,
        ["--num", "4", "--output_file", str(orders)],
        "--output_file",
        "exists",
        "--overwrite",
    )
    _refused(
        capsys,
        ["--visualize", "--output_file", str(photo)],
        "--output_file",
        "not written by lpd",
        "--overwrite",
    )
    _refused(
        capsys,
        ["--visualize", "--orders_file", str(photo), "--output_file", str(photo), "--overwrite"],
        "is also --orders_file",
        "never an input",
    )
    assert (orders.read_bytes(), photo.read_bytes()) == before


def test_cli_replaces_its_own_picture_and_with_overwrite_any_file(tmp_path, capsys):
    out, orders = tmp_path / "order.png", tmp_path / "o.json"
    drawn = ["--visualize", "--generation_steps", "8", "--output_file", str(out), "--no_progress"]
    assert (
        cli_main(drawn) == 0 and cli_main(drawn + ["--index", "1"]) == 0
    )  # a picture lpd drew is replaced
    orders.write_text("[[0]]")
    assert (
        cli_main(
            [
                "--num",
                "2",
                "--workers",
                "1",
                "--output_file",
                str(orders),
                "--no_progress",
                "--overwrite",
            ]
        )
        == 0
    )
    assert load_orders(orders, 2, 16).shape == (2, 256)


def test_cli_refuses_unwritable_output_folder(tmp_path, capsys, nothing_drawn, monkeypatch):
    # os.access rather than chmod: a test running as root may write anywhere
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path) else real(p, mode)
    )
    _refused(
        capsys,
        ["--num", "4", "--output_file", str(tmp_path / "new" / "o.json")],
        "--output_file",
        "not writable",
    )
    _refused(
        capsys,
        ["--visualize", "--output_file", str(tmp_path / "o.png")],
        "--output_file",
        "not writable",
    )
    assert os.listdir(tmp_path) == []


def test_cli_refuses_bad_index_and_orders_files(tmp_path, capsys, monkeypatch):
    from lpd.orders import visualize

    def never(*a, **k):
        raise AssertionError("drawn despite a bad --index or --orders_file")

    monkeypatch.setattr(visualize, "render_order", never)
    out = str(tmp_path / "o.png")
    _refused(
        capsys,
        ["--visualize", "--index", "5", "--num", "5", "--output_file", out],
        "--index 5",
        "--num 5",
    )
    _refused(capsys, ["--visualize", "--index", "-1", "--output_file", out], "--index")
    missing = str(tmp_path / "missing.json")
    _refused(
        capsys,
        ["--visualize", "--orders_file", missing, "--output_file", out],
        "--orders_file",
        missing,
    )
    (tmp_path / "bad.json").write_text("[[0, 1, 2")
    _refused(
        capsys,
        ["--visualize", "--orders_file", str(tmp_path / "bad.json"), "--output_file", out],
        "--orders_file",
        "bad.json",
        "not valid JSON",
    )
    save_orders(tmp_path / "three.json", lpd_orders(3, G256, 16, 1.0, 2.0))
    _refused(
        capsys,
        [
            "--visualize",
            "--orders_file",
            str(tmp_path / "three.json"),
            "--index",
            "3",
            "--output_file",
            out,
        ],
        "--index 3",
        "three.json",
        "has 3 orders",
    )
    assert not os.path.exists(out)
    monkeypatch.undo()
    assert (
        cli_main(
            [
                "--visualize",
                "--orders_file",
                str(tmp_path / "three.json"),
                "--index",
                "2",
                "--output_file",
                str(tmp_path / "new" / "o.png"),
            ]
        )
        == 0
    )  # missing folders are created
    assert (tmp_path / "new" / "o.png").is_file()


def test_cli_write_failure_is_exit_1(tmp_path, capsys, monkeypatch):
    from lpd.orders import cli

    def disk_full(path, orders):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "save_orders", disk_full)
    assert (
        cli_main(
            [
                "--num",
                "2",
                "--workers",
                "1",
                "--no_progress",
                "--output_file",
                str(tmp_path / "o.json"),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: could not write --output_file") and "No space left" in err


def test_cli_as_a_process_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "lpd.orders", "--output_file", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (
        proc.returncode == 2
        and proc.stderr.startswith("error: --output_file")
        and "Traceback" not in proc.stderr
    )


def test_visualize_writes_a_png(tmp_path):
    out = tmp_path / "order.png"
    assert (
        cli_main(
            [
                "--visualize",
                "--generation_steps",
                "8",
                "--repulsion_threshold",
                "2",
                "--output_file",
                str(out),
            ]
        )
        == 0
    )
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300


def test_pictures_and_statistics_refuse_rows_that_are_not_permutations():
    from lpd.orders.visualize import render_order

    with pytest.raises(OrderFileError, match="order: row 0: position 2 appears twice"):
        render_order([0, 1, 2, 2], [4], 2)
    with pytest.raises(OrderFileError, match="orders: row 1: entry 3 is 4, outside"):
        order_statistics(np.array([[0, 1, 2, 3], [0, 1, 2, 4]]), [4], 2, 1.0)
