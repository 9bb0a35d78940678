"""Generation orders: locality-aware (LPD, spec section 5), uniformly random and raster.

An order is a permutation of the raster positions ``0..N-1`` of a ``G x G`` token grid; group
sizes ``g_0..g_{K-1}`` split it into decoding steps.  :func:`lpd_orders` builds the
locality-aware orders of the released generator, vectorised over many orders at once:

* proximity scores are kept as small integer codes (edge and diagonal neighbour counts) and
  updated incrementally after each step;
* each step sorts only the candidates whose score reaches ``proximity_threshold`` (all orders in
  one ``np.sort`` of packed integer keys), then walks them rank by rank for all orders at once,
  with the repulsion windows of accepted positions painted into a padded "blocked" grid;
* the farthest-point fallback keeps, per order, the squared distance to the nearest position
  taken in this step, packed with the tie-breaking priority in one int64 per position.

Randomness is counter-based: every random number is a hash of ``(seed, i, step, position)``, so
order ``i`` of a run depends only on ``(seed, i)`` and any slice of a run can be regenerated
alone (``start=``) with identical rows, whatever the batching or the number of workers.

Ties are broken as in the released generator: candidates are shuffled and then sorted by score
(random order among equal scores); the farthest-point fallback takes the largest distance, and
among equal distances the candidate that comes first in the released candidate list, i.e. first
the positions whose score is below ``proximity_threshold`` (highest score first, random among
equal scores), then those at or above it (same rule).  :func:`_lpd_order_reference` is a plain,
one-order-at-a-time transcription of the same rules, used by the tests to check the fast path.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

from lpd.schedules import validate_group_sizes

__all__ = ["lpd_orders", "random_orders", "raster_orders", "ORDER_KINDS"]

#: Meaning of the per-position codes that ``_lpd_batch(..., return_kinds=True)`` reports.
ORDER_KINDS = {
    0: "step 0 (uniformly random position)",
    1: "proximity pick",
    2: "farthest-point fallback",
    3: "fallback start (random: nothing accepted in this step yet)",
    4: "last remaining positions (fallback with no choice left)",
}
KIND_START, KIND_PROXIMITY, KIND_FARTHEST, KIND_RANDOM_FILL, KIND_REST = 0, 1, 2, 3, 4

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_GOLDEN64 = 0x9E3779B97F4A7C15
_SALT_START = 0x5851F42D4C957F2D  # step-0 position
_SALT_FILL = 0x2545F4914F6CDD1D  # random fallback start
_SALT_RANDOM = 0xD1342543DE82EF95  # random_orders
_D2_SHIFT = 38  # squared distances sit above the 38-bit fallback priority
_SEL = 100  # proximity code of an already selected position (codes < 25 are unselected)


# ---------------------------------------------------------------------------------------------
# Counter-based randomness
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (a bijection with good avalanche)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(_GOLDEN64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def _order_keys(seed: int, idx: np.ndarray, salt: int = 0) -> np.ndarray:
    """One uint64 key per order index, a function of ``(seed, i, salt)`` only."""
    with np.errstate(over="ignore"):
        s = _splitmix64(np.array([seed ^ salt], dtype=np.uint64))
        return _splitmix64(s ^ _splitmix64(idx.astype(np.uint64)))


def _step_keys(order_keys: np.ndarray, step: int, salt: int = 0) -> np.ndarray:
    with np.errstate(over="ignore"):
        t = np.uint64((step * _GOLDEN64 + salt) & 0xFFFFFFFFFFFFFFFF)
        return _splitmix64(order_keys ^ t)


@lru_cache(maxsize=None)
def _pos_mult(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B9) & np.uint64(0xFFFFFFFF)).astype(
        np.uint32
    )


def _position_random(step_keys: np.ndarray, n: int) -> np.ndarray:
    """uint32 ``[B, n]`` random numbers, a hash of (step key, position)."""
    lo = (step_keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (step_keys >> np.uint64(32)).astype(np.uint32)[:, None]
    with np.errstate(over="ignore"):
        h = lo + _pos_mult(n)[None, :]
        h ^= hi
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
        h ^= h >> np.uint32(16)
    return h


def _uniform_index(keys: np.ndarray, n: int) -> np.ndarray:
    """An index in ``[0, n)`` per uint64 key (multiply-high; bias below ``n / 2**32``)."""
    return ((keys >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_count(name: str, v: int, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _check_threshold(name: str, v: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}") from e
    if not math.isfinite(f) or f < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return f


def _check_setup(
    num: int, group_sizes: Sequence[int], grid_size: int, seed: int, start: int
) -> tuple[int, list[int], int, int, int]:
    num = _check_count("num", num)
    grid_size = _check_count("grid_size", grid_size, 1)
    if grid_size > 256:
        raise ValueError(f"grid_size {grid_size} is too large (at most 256 x 256 tokens)")
    sizes = validate_group_sizes(group_sizes, grid_size * grid_size)
    return num, sizes, grid_size, _check_seed(seed), _check_count("start", start)


# ---------------------------------------------------------------------------------------------
# Grid tables
# ---------------------------------------------------------------------------------------------

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# Proximity codes: 5 * (edge neighbours selected) + (diagonal neighbours selected), 0..24.
_CODE_VALUE = np.array([a + b * _INV_SQRT2 for a in range(5) for b in range(5)])
# Walk rank of a code: 0 for the highest score (distinct codes have distinct scores).
_CODE_RANK = np.empty(25, dtype=np.int64)
_CODE_RANK[np.argsort(-_CODE_VALUE, kind="stable")] = np.arange(25)


class _Grid:
    """Per-(grid, repulsion radius) lookup tables, built once and cached."""

    def __init__(self, g: int, radius: int) -> None:
        n = g * g
        self.g, self.n, self.radius = g, n, radius
        rows, cols = np.divmod(np.arange(n), g)
        self.rows, self.cols = rows, cols
        # 8-neighbourhood: neighbour index (n = outside the grid) and code increment.
        nbr, delta = [], []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy == dx == 0:
                    continue
                r, c = rows + dy, cols + dx
                inside = (r >= 0) & (r < g) & (c >= 0) & (c < g)
                nbr.append(np.where(inside, r * g + c, n))
                delta.append(5 if dy == 0 or dx == 0 else 1)
        self.nbr = np.stack(nbr)
        self.nbr_delta = delta
        # Repulsion windows in a grid padded by `radius` on every side.
        p = g + 2 * radius
        self.padded = p
        self.pidx = (rows + radius) * p + (cols + radius)
        dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1))
        self.window = (dy * p + dx).ravel()
        self.cbits = max(1, int(n - 1).bit_length())
        self._d2 = None

    def d2_shifted(self, q: np.ndarray) -> np.ndarray:
        """``d2 << 38`` from positions ``q`` ([B]) to every position (int64 [B, n]).

        ``d2`` is the squared Euclidean distance; a table is kept for grids up to 32 x 32.
        """
        if self.n <= 1024:
            if self._d2 is None:
                dr = self.rows[:, None] - self.rows[None, :]
                dc = self.cols[:, None] - self.cols[None, :]
                self._d2 = (dr * dr + dc * dc) << _D2_SHIFT
            return self._d2[q]
        dr = self.rows[None, :] - self.rows[q][:, None]
        dc = self.cols[None, :] - self.cols[q][:, None]
        return (dr * dr + dc * dc) << _D2_SHIFT


@lru_cache(maxsize=16)
def _grid(g: int, radius: int) -> _Grid:
    return _Grid(g, radius)


def _code_tables(proximity_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lookup tables over proximity codes 0..127 (>= _SEL means already selected).

    Returns ``high`` (bool: an unselected candidate whose score reaches the threshold), ``walk``
    (int64 walk rank, 0 = best) and ``prio`` (int64 fallback tie priority, shifted left by 32;
    2**62 for selected positions).
    """
    high = np.zeros(128, dtype=bool)
    high[:25] = _CODE_VALUE >= proximity_threshold
    walk = np.zeros(128, dtype=np.int64)
    walk[:25] = _CODE_RANK
    prio = np.full(128, 1 << 62, dtype=np.int64)
    prio[:25] = ((high[:25].astype(np.int64) << 5) | _CODE_RANK) << 32
    return high, walk, prio


# ---------------------------------------------------------------------------------------------
# The fast batched generator
# ---------------------------------------------------------------------------------------------


def _lpd_batch(
    idx: np.ndarray,
    seed: int,
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float,
    repulsion_threshold: float,
    return_kinds: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """LPD orders for the order indices ``idx`` (checked inputs), ``[len(idx), N]`` int64.

    With ``return_kinds`` also returns an int8 array of the same shape whose entries say how each
    position was chosen (keys of :data:`ORDER_KINDS`).
    """
    grid = _grid(grid_size, int(math.floor(repulsion_threshold)))
    n, b_num = grid.n, len(idx)
    high_t, walk_t, prio_t = _code_tables(proximity_threshold)
    out = np.empty((b_num, n), dtype=np.int64)
    kinds = np.empty((b_num, n), dtype=np.int8) if return_kinds else None
    if b_num == 0:
        return (out, kinds) if return_kinds else out
    rows_b = np.arange(b_num)
    okeys = _order_keys(seed, idx)
    code = np.zeros((b_num, n + 1), dtype=np.uint8)  # column n: "outside the grid"
    code_flat = code.reshape(-1)
    pp = grid.padded * grid.padded
    blocked = np.full(b_num * pp, -1, dtype=np.int32)  # step that blocked a padded cell
    cb = grid.cbits
    c_mask = (1 << cb) - 1

    def commit(s0: int, s1: int) -> None:
        # Positions out[:, s0:s1] are now selected: mark them and update their neighbours' codes.
        new = out[:, s0:s1]
        base = (rows_b * (n + 1))[:, None]
        code_flat[(base + new).ravel()] = _SEL
        for nb, dlt in zip(grid.nbr, grid.nbr_delta):
            code_flat[(base + nb[new]).ravel()] += dlt

    # Step 0: one uniformly random position.
    out[:, 0] = _uniform_index(_splitmix64(okeys ^ np.uint64(_SALT_START)), n)
    if kinds is not None:
        kinds[:, 0] = KIND_START
    if group_sizes[0] > 1:
        # Not in any released schedule: the rest of step 0 comes from the farthest-point rule
        # around the random first position (no scores exist before step 0).
        g = group_sizes[0]
        code_flat[rows_b * (n + 1) + out[:, 0]] = _SEL
        rnd = _position_random(_step_keys(okeys, 0), n)
        prio = prio_t[code[:, :n]] | rnd.astype(np.int64)
        acc_n = np.ones(b_num, dtype=np.int64)
        acc_pos = out[:, :1].copy()
        fill_keys = _step_keys(_step_keys(okeys, 0), 0, _SALT_FILL)
        _fallback(grid, out, kinds, prio, rows_b, acc_n, acc_pos, g - acc_n, 0, fill_keys, g == n)
    s = group_sizes[0]
    commit(0, s)

    for k in range(1, len(group_sizes)):
        g = group_sizes[k]
        skeys = _step_keys(okeys, k)
        rnd = _position_random(skeys, n)
        cur = code[:, :n]
        # ---- proximity walk -----------------------------------------------------------------
        flat = np.flatnonzero(high_t[cur])
        b_of, c_of = np.divmod(flat, n)
        keys = (
            (b_of << (cb + 37))
            | (walk_t[cur.reshape(-1)[flat]] << (cb + 32))
            | (rnd.reshape(-1)[flat].astype(np.int64) << cb)
            | c_of
        )
        keys.sort()
        cand_sorted = keys & c_mask
        counts = np.bincount(b_of, minlength=b_num)
        starts = np.cumsum(counts) - counts
        acc_n = np.zeros(b_num, dtype=np.int64)
        acc_pos = np.zeros((b_num, g), dtype=np.int64)
        act = np.flatnonzero(counts > 0)
        r = 0
        while act.size:
            cand = cand_sorted[starts[act] + r]
            cell = act * pp + grid.pidx[cand]
            ok = blocked[cell] != k
            a_b = act[ok]
            acc_pos[a_b, acc_n[a_b]] = cand[ok]
            acc_n[a_b] += 1
            blocked[(cell[ok])[:, None] + grid.window] = k
            r += 1
            act = act[(acc_n[act] < g) & (counts[act] > r)]
        s0 = s
        took = np.arange(g)[None, :] < acc_n[:, None]
        out[:, s0 : s0 + g][took] = acc_pos[took]
        if kinds is not None:
            kinds[:, s0 : s0 + g][took] = KIND_PROXIMITY
        # Accepted positions leave the candidate pool of the fallback.
        code_flat[(rows_b * (n + 1))[:, None].repeat(g, 1)[took] + acc_pos[took]] = _SEL
        # ---- farthest-point fallback --------------------------------------------------------
        need = g - acc_n
        fb = np.flatnonzero(need > 0)
        if fb.size:
            prio = prio_t[code[fb, :n]] | rnd[fb].astype(np.int64)
            fill_keys = _step_keys(skeys, 0, _SALT_FILL)  # only its rows `fb` are used
            _fallback(grid, out, kinds, prio, fb, acc_n, acc_pos, need, s0, fill_keys, s0 + g == n)
        s += g
        commit(s0, s)
    return (out, kinds) if return_kinds else out


def _fallback(
    grid: _Grid,
    out: np.ndarray,
    kinds: np.ndarray | None,
    prio: np.ndarray,
    fb: np.ndarray,
    acc_n: np.ndarray,
    acc_pos: np.ndarray,
    need: np.ndarray,
    s0: int,
    fill_keys: np.ndarray,
    last: bool,
) -> None:
    """Farthest-point fallback of one step for the orders ``fb``.

    ``prio`` (``[len(fb), N]`` int64) is the tie priority of every position, smaller preferred,
    ``>= 2**62`` for positions already taken (earlier steps or accepted in this step).  Writes
    ``need[b]`` positions after the ``acc_n[b]`` proximity picks of step ``[s0, s0 + g)``.
    """
    n = grid.n
    nd = need[fb]
    na = acc_n[fb]
    width = int(nd.max())
    picks = np.zeros((fb.size, width), dtype=np.int64)
    pick_kind = np.full((fb.size, width), KIND_FARTHEST, dtype=np.int8)
    if last:
        # Only the remaining positions are left: all of them, in candidate-list order.
        picks[:] = np.argsort(prio, axis=1, kind="stable")[:, :width]
        pick_kind[:] = KIND_REST
    else:
        # key = (squared distance to the nearest position taken in this step) << 38 - priority:
        # its argmax is the farthest position, ties going to the preferred (smallest) priority.
        shift = _D2_SHIFT
        key = np.empty((fb.size, n), dtype=np.int64)
        made = np.zeros(fb.size, dtype=np.int64)
        has = na > 0
        if has.any():
            ih = np.flatnonzero(has)
            pos = acc_pos[fb[ih]]
            kh = grid.d2_shifted(pos[:, 0])
            for j in range(1, int(na[ih].max())):
                np.minimum(kh, grid.d2_shifted(pos[np.arange(ih.size), np.minimum(j, na[ih] - 1)]), out=kh)
            key[ih] = kh
        if not has.all():
            # Nothing accepted in this step: start from a uniformly random remaining position.
            iz = np.flatnonzero(~has)
            fill = _position_random(fill_keys[fb[iz]], n).astype(np.int64)
            fill[prio[iz] >= (1 << 62)] = -1
            p0 = fill.argmax(axis=1)
            picks[iz, 0] = p0
            pick_kind[iz, 0] = KIND_RANDOM_FILL
            made[iz] = 1
            key[iz] = grid.d2_shifted(p0)
        key -= prio
        rows = np.flatnonzero(made < nd)  # rows of `key`/`prio` still being filled
        key, pr = key[rows], prio[rows]
        done = np.zeros(rows.size, dtype=bool)
        while rows.size:
            p = key.argmax(axis=1)
            live = ~done
            lr = rows[live]
            picks[lr, made[lr]] = p[live]
            made[lr] += 1
            done[live] = made[lr] >= nd[lr]
            if done.all():
                break
            if 4 * int(done.sum()) >= rows.size:  # compact once a quarter has finished
                keep = ~done
                rows, key, pr, p, done = rows[keep], key[keep], pr[keep], p[keep], done[keep]
            np.minimum(key, grid.d2_shifted(p) - pr, out=key)
    took = np.arange(width)[None, :] < nd[:, None]
    r_idx = np.broadcast_to(fb[:, None], took.shape)[took]
    c_idx = (s0 + na[:, None] + np.arange(width)[None, :])[took]
    out[r_idx, c_idx] = picks[took]
    if kinds is not None:
        kinds[r_idx, c_idx] = pick_kind[took]


# ---------------------------------------------------------------------------------------------
# Plain one-order reference (tests)
# ---------------------------------------------------------------------------------------------


def _lpd_order_reference(
    i: int,
    seed: int,
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
) -> tuple[list[int], list[int]]:
    """Order ``i`` of a run, one position at a time, straight from spec section 5.

    Slow (pure Python); uses the same random numbers and tie rules as :func:`lpd_orders`, so the
    two must agree exactly.  Returns the order and the kind of every pick (:data:`ORDER_KINDS`).
    """
    g_, n = grid_size, grid_size * grid_size
    okey = _order_keys(seed, np.array([i]))
    pos = [(c // g_, c % g_) for c in range(n)]

    def cheb(a: int, b: int) -> int:
        return max(abs(pos[a][0] - pos[b][0]), abs(pos[a][1] - pos[b][1]))

    def d2(a: int, b: int) -> int:
        return (pos[a][0] - pos[b][0]) ** 2 + (pos[a][1] - pos[b][1]) ** 2

    def fill(step_key: np.ndarray, accepted: list[int], rest: list[int], need: int) -> list[tuple[int, int]]:
        # Farthest-point sampling over the candidate list `rest` (its order breaks ties).
        if len(rest) <= need:
            return [(c, KIND_REST) for c in rest]
        taken: list[tuple[int, int]] = []
        pts = list(accepted)
        rest = list(rest)
        if not pts:
            h = _position_random(_step_keys(step_key, 0, _SALT_FILL), n)[0]
            c = max(rest, key=lambda c: (int(h[c]), -c))
            taken.append((c, KIND_RANDOM_FILL))
            pts.append(c)
            rest.remove(c)
        while len(taken) < need:
            best = max(range(len(rest)), key=lambda j: (min(d2(rest[j], p) for p in pts), -j))
            c = rest.pop(best)
            taken.append((c, KIND_FARTHEST))
            pts.append(c)
        return taken

    order = [int(_uniform_index(_splitmix64(okey ^ np.uint64(_SALT_START)), n)[0])]
    kinds = [KIND_START]
    if group_sizes[0] > 1:
        step_key = _step_keys(okey, 0)
        rnd = _position_random(step_key, n)[0]
        rest = sorted((c for c in range(n) if c != order[0]), key=lambda c: (int(rnd[c]), c))
        for c, kd in fill(step_key, order[:1], rest, group_sizes[0] - 1):
            order.append(c)
            kinds.append(kd)
    for k in range(1, len(group_sizes)):
        g = group_sizes[k]
        step_key = _step_keys(okey, k)
        rnd = _position_random(step_key, n)[0]
        done = set(order)
        score = {}
        for c in range(n):
            if c in done:
                continue
            edge = sum(1 for p in done if cheb(c, p) == 1 and d2(c, p) == 1)
            diag = sum(1 for p in done if cheb(c, p) == 1 and d2(c, p) == 2)
            score[c] = edge + diag * _INV_SQRT2
        ranked = sorted(score, key=lambda c: (-score[c], int(rnd[c]), c))
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
            for c, kd in fill(step_key, accepted, rest, g - len(accepted)):
                order.append(c)
                kinds.append(kd)
    return order, kinds


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def lpd_orders(
    num: int,
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
    seed: int = 0,
    start: int = 0,
    batch_size: int = 512,
) -> np.ndarray:
    """Locality-aware generation orders (spec section 5).

    Parameters
    ----------
    num : int
        Number of orders.
    group_sizes : sequence of int
        Tokens decoded per step; sums to ``grid_size ** 2``.  Step 0 takes one uniformly random
        position (a larger ``group_sizes[0]``, which no released schedule has, fills the rest of
        step 0 by the farthest-point rule around it).
    grid_size : int
        Side ``G`` of the token grid (16 at 256 px, 32 at 512 px).
    proximity_threshold : float, optional
        ``τp``: a candidate needs a proximity score ``>= τp`` to be taken by locality.
    repulsion_threshold : float, optional
        ``τr``: two proximity picks of one step are never within Chebyshev distance ``<= τr``
        (2.0 for the released 256 px settings, 3.0 for XXL-256, 4.0 at 512 px).
    seed : int, optional
        Seed of the run, in ``[0, 2**64)``.
    start : int, optional
        Index of the first order: the rows are orders ``start .. start + num - 1`` of the run,
        and row ``i`` depends only on ``(seed, i)``.
    batch_size : int, optional
        Orders generated together (memory/speed trade-off only; the result does not change).

    Returns
    -------
    np.ndarray
        int64 ``[num, grid_size ** 2]``, each row a permutation of ``0 .. N-1``.

    Raises
    ------
    ValueError
        For group sizes that do not fit the grid, negative thresholds or counts, bad seeds.
    """
    num, sizes, grid_size, seed, start = _check_setup(num, group_sizes, grid_size, seed, start)
    tp = _check_threshold("proximity_threshold", proximity_threshold)
    tr = _check_threshold("repulsion_threshold", repulsion_threshold)
    batch_size = _check_count("batch_size", batch_size, 1)
    n = grid_size * grid_size
    out = np.empty((num, n), dtype=np.int64)
    for b0 in range(0, num, batch_size):
        idx = np.arange(start + b0, start + min(num, b0 + batch_size), dtype=np.int64)
        out[b0 : b0 + idx.size] = _lpd_batch(idx, seed, sizes, grid_size, tp, tr)
    return out


def random_orders(num: int, grid_size: int, seed: int = 0, start: int = 0) -> np.ndarray:
    """Uniformly random orders; row ``i`` (``start <= i < start + num``) depends only on ``(seed, i)``.

    Returns
    -------
    np.ndarray
        int64 ``[num, grid_size ** 2]``.
    """
    num = _check_count("num", num)
    grid_size = _check_count("grid_size", grid_size, 1)
    seed, start = _check_seed(seed), _check_count("start", start)
    n = grid_size * grid_size
    keys = _order_keys(seed, np.arange(start, start + num, dtype=np.int64), _SALT_RANDOM)
    with np.errstate(over="ignore"):
        h = _splitmix64(keys[:, None] ^ (np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN64))[None, :])
    return np.argsort(h, axis=1, kind="stable").astype(np.int64)


def raster_orders(num: int, grid_size: int) -> np.ndarray:
    """Raster orders (row by row, left to right): ``num`` copies of ``0 .. N-1``, int64."""
    num = _check_count("num", num)
    grid_size = _check_count("grid_size", grid_size, 1)
    return np.tile(np.arange(grid_size * grid_size, dtype=np.int64), (num, 1))
