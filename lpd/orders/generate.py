"""Generation orders: locality-aware (LPD, spec section 5), uniformly random and raster.

An order is a permutation of the raster positions ``0..N-1`` of a ``G x G`` token grid; group
sizes ``g_0..g_{K-1}`` split it into decoding steps.  :func:`lpd_orders` builds the
locality-aware orders of the released generator, vectorised over many orders at once:

* proximity scores are kept as small integer codes (5 x edge + diagonal selected neighbours)
  and updated incrementally around each step's picks, together with each position's
  fallback priority (which also marks the proximity candidates);
* each step gathers the candidates whose score reaches ``proximity_threshold`` into one row per
  order, sorts the rows (score, then random), and walks rank by rank for all orders at once,
  painting the repulsion window of every accepted position into a padded "blocked" grid;
* the farthest-point fallback keeps, per order, the squared distance to the nearest position
  taken in this step packed above a 20-bit tie priority in one int32 per position, and runs in
  row chunks whose arrays stay in cache.

Randomness is counter-based: every random number is a hash of ``(seed, i, step, position)``, so
order ``i`` of a run depends only on ``(seed, i)`` and any slice of a run can be regenerated
alone (``start=``) with identical rows, whatever the batching or the number of workers.

Ties are broken as in the released generator: candidates are shuffled and then sorted by score
(random order among equal scores); the farthest-point fallback takes the largest distance, and
among equal distances the candidate that comes first in the released candidate list, i.e. first
the positions whose score is below ``proximity_threshold`` (highest score first, random among
equal scores), then those at or above it (same rule; the random part uses the top 14 bits of the
position's random number, then the raster index).  :func:`_lpd_order_reference` is a plain,
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

_GOLDEN64 = 0x9E3779B97F4A7C15
_SALT_START = 0x5851F42D4C957F2D  # step-0 position
_SALT_FILL = 0x2545F4914F6CDD1D  # random fallback start
_SALT_RANDOM = 0xD1342543DE82EF95  # random_orders
_TABLE_MAX_N = 1024  # grids up to this many positions keep N x N distance tables
_INT32_KEY_MAX_G = 32  # fallback keys fit int32 up to 32 x 32 grids
_FALLBACK_ROWS = 128  # fallback rows per chunk: their arrays stay in cache
_KEY_PAD = np.iinfo(np.int64).max  # pads the per-order candidate rows; sorts last
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
    """``position * 0x9E3779B9 mod 2**32`` for positions ``0..n-1`` (uint32)."""
    return (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B9) & np.uint64(0xFFFFFFFF)).astype(
        np.uint32
    )


def _key32(step_keys: np.ndarray) -> np.ndarray:
    """Fold uint64 step keys to the uint32 keys :func:`_hash32` takes."""
    return ((step_keys ^ (step_keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _hash32(key32: np.ndarray, pos_mult: np.ndarray) -> np.ndarray:
    """uint32 random numbers: a hash of (uint32 step key, position); the top bits are the best.

    ``pos_mult`` is ``_pos_mult(n)`` indexed by the positions; both arguments broadcast
    (e.g. ``keys[:, None]`` with ``_pos_mult(n)[None, :]`` for whole grids).  Two
    multiply-xorshift rounds: enough for tie-breaking, and cheap on whole grids.
    """
    with np.errstate(over="ignore"):
        h = key32 + pos_mult
        h *= np.uint32(0x7FEB352D)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x846CA68B)
    return h


def _position_random(step_keys: np.ndarray, n: int) -> np.ndarray:
    """uint32 ``[B, n]``: :func:`_hash32` of every position for each of the ``B`` uint64 keys."""
    return _hash32(_key32(step_keys)[:, None], _pos_mult(n)[None, :])


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
    if math.isnan(f) or f < 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")
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
# Fallback ties: a 20-bit priority (larger preferred): 6 bits for the position's group in the
# released candidate list (scores below τp first, higher scores first), then the top 14 bits of
# the position's random number (larger first, as in the walk); then the smaller raster index.
_TIE_BITS = 20
_TIE_RND_SHIFT = 32 - (_TIE_BITS - 6)


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
        self.nbr8 = np.ascontiguousarray(np.stack(nbr).T)  # [n, 8]
        self.nbr8_delta = np.array(delta, dtype=np.uint8)
        # Repulsion windows in a grid padded by `radius` on every side.
        p = g + 2 * radius
        self.padded_cells = p * p
        self.pidx = (rows + radius) * p + (cols + radius)
        self.unpad = np.zeros(p * p, dtype=np.int64)  # raster index of a padded cell
        self.unpad[self.pidx] = np.arange(n)
        dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1))
        self.window = (dy * p + dx).ravel()
        # Fallback keys ``d2 << 20 | priority`` fit int32 up to 32 x 32 grids.
        self.key_dtype = np.int32 if g <= _INT32_KEY_MAX_G else np.int64
        assert g > _INT32_KEY_MAX_G or (2 * (g - 1) ** 2 + 1) << _TIE_BITS < 2**31
        self.taken = -(2**31) if self.key_dtype == np.int32 else -(2**62)
        self.tables = n <= _TABLE_MAX_N
        self._d2 = None  # int16 [n, n] squared distances (grids up to 32 x 32)
        self._d2_key = None  # the same, shifted into key position

    def _tables(self) -> None:
        dr = self.rows[:, None] - self.rows[None, :]
        dc = self.cols[:, None] - self.cols[None, :]
        d2 = dr * dr + dc * dc
        self._d2 = d2.astype(np.int16)
        self._d2_key = (d2 << _TIE_BITS).astype(self.key_dtype)

    def d2(self, q: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances from positions ``q`` ([B]) to all positions ([B, n])."""
        if self.tables:
            if self._d2 is None:
                self._tables()
            return self._d2[q]
        dr = self.rows - self.rows[q][:, None]
        dc = self.cols - self.cols[q][:, None]
        return dr * dr + dc * dc

    def d2_key(self, q: np.ndarray) -> np.ndarray:
        """``d2 << 20`` from positions ``q`` ([B]) to all positions, in :attr:`key_dtype`."""
        if self.tables:
            if self._d2_key is None:
                self._tables()
            return self._d2_key[q]
        return (self.d2(q) << _TIE_BITS).astype(self.key_dtype)


@lru_cache(maxsize=16)
def _grid(g: int, radius: int) -> _Grid:
    return _Grid(g, radius)


@lru_cache(maxsize=16)
def _code_tables(proximity_threshold: float, taken: int) -> np.ndarray:
    """Fallback tie priority of every proximity code 0..255 (>= ``_SEL``: already selected).

    For an unselected position: its group in the released candidate list (scores below ``τp``
    first, then higher scores first), inverted so that larger is preferred and shifted into
    place: ``(63 - ((score >= τp) << 5 | walk rank)) << 14``.  A proximity candidate (score >=
    ``τp``) thus has a value below ``32 << 14`` and its walk rank is ``31 - (value >> 14)``.
    Selected positions get ``taken``: negative enough to keep them out of the fallback whatever
    their distance.
    """
    high = _CODE_VALUE >= proximity_threshold
    tie = np.full(256, taken, dtype=np.int64)
    group = (high.astype(np.int64) << 5) | _CODE_RANK
    tie[:25] = (63 - group) << (_TIE_BITS - 6)
    return tie


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
    # Chebyshev distances on the grid are integers below grid_size: clamp the window radius.
    grid = _grid(grid_size, int(math.floor(min(repulsion_threshold, grid_size - 1))))
    n, b_num = grid.n, len(idx)
    tie_t = _code_tables(proximity_threshold, grid.taken).astype(grid.key_dtype)
    out = np.empty((b_num, n), dtype=np.int64)
    kinds = np.empty((b_num, n), dtype=np.int8) if return_kinds else None
    if b_num == 0:
        return (out, kinds) if return_kinds else out
    rows_b = np.arange(b_num)
    row_base = rows_b * (n + 1)
    okeys = _order_keys(seed, idx)
    # Per-order state over the grid plus one "outside the grid" column (index n):
    code = np.zeros((b_num, n + 1), dtype=np.uint8)  # proximity code, _SEL once selected
    # Fallback group priority of every position, ``grid.taken`` once selected; it also tells
    # the proximity candidates apart: unselected with score >= τp <=> 0 <= tie < high_limit.
    tie = np.full((b_num, n + 1), tie_t[0], dtype=grid.key_dtype)
    tie[:, n] = grid.taken
    tie_u = tie.view(np.uint32 if grid.key_dtype == np.int32 else np.uint64)
    high_limit = 32 << (_TIE_BITS - 6)
    code_f, tie_f = code.reshape(-1), tie.reshape(-1)
    pp = grid.padded_cells
    blocked = np.zeros(b_num * pp, dtype=np.uint8)  # stamp of the step that blocked a cell
    pos_mult = _pos_mult(n)
    window = grid.window
    pbits = max(1, int(pp - 1).bit_length())
    p_mask = (1 << pbits) - 1
    high_top = 31 << (_TIE_BITS - 6)  # tie priority of a candidate of walk rank 0

    def commit(s0: int, s1: int) -> None:
        # Positions out[:, s0:s1] are now selected: mark them, update their neighbours.
        new_pos = out[:, s0:s1]
        new = row_base[:, None] + new_pos
        code_f[new] = _SEL
        touched = grid.nbr8[new_pos]  # [B, g, 8]
        touched += row_base[:, None, None]
        touched = touched.reshape(-1)
        np.add.at(code_f, touched, np.broadcast_to(grid.nbr8_delta, (new.size, 8)).reshape(-1))
        tie_f[touched] = tie_t[code_f[touched]]
        tie[:, n] = grid.taken
        tie_f[new] = grid.taken

    # Step 0: one uniformly random position.
    out[:, 0] = _uniform_index(_splitmix64(okeys ^ np.uint64(_SALT_START)), n)
    if kinds is not None:
        kinds[:, 0] = KIND_START
    if group_sizes[0] > 1:
        # Not in any released schedule: the rest of step 0 comes from the farthest-point rule
        # around the random first position (no scores exist before step 0).
        g = group_sizes[0]
        tie_f[row_base + out[:, 0]] = grid.taken
        acc_n = np.ones(b_num, dtype=np.int64)
        _fallback(
            grid, out, kinds, tie, _step_keys(okeys, 0), rows_b, acc_n, out[:, :1].copy(), g - acc_n, 0,
            g == n,
        )
    s = group_sizes[0]
    commit(0, s)

    for k in range(1, len(group_sizes)):
        g, s0 = group_sizes[k], s
        skeys = _step_keys(okeys, k)
        k32 = _key32(skeys)
        stamp = (k - 1) % 255 + 1
        if stamp == 1 and k > 1:
            blocked.fill(0)
        # ---- candidates with score >= τp, sorted per order: score desc, then random ---------
        flat = np.flatnonzero(tie_u < high_limit)
        starts = np.searchsorted(flat, row_base)
        counts = np.diff(np.append(starts, flat.size))
        b_of = np.repeat(rows_b, counts)
        c_of = flat - row_base[b_of]
        rnd = _hash32(k32[b_of], pos_mult[c_of])
        # Sort key: walk rank of the score (from the tie priority: rank << 14 for candidates),
        # then the random number (larger first), then the padded cell of the position.
        keys = (high_top - tie_f[flat]).astype(np.int64)
        keys <<= pbits + 32 - (_TIE_BITS - 6)
        keys |= (~rnd).astype(np.int64) << pbits
        keys |= grid.pidx[c_of]
        # One row per order, longest candidate list first (so the orders still walking at rank
        # r are the first rows), padded with a key that sorts last; each row sorted on its own.
        width = int(counts.max(initial=0))
        by_len = np.argsort(-counts, kind="stable")
        row_of = np.empty(b_num, dtype=np.int64)
        row_of[by_len] = rows_b
        table = np.full((b_num, width), _KEY_PAD, dtype=np.int64)
        table.reshape(-1)[np.arange(flat.size) + (row_of * width - starts)[b_of]] = keys
        table.sort(axis=1)
        cells = table & p_mask
        cells += (by_len * pp)[:, None]
        # ---- the walk: rank r of every order at once ----------------------------------------
        # The walk does not stop at g: the first g acceptances are the same either way, and
        # only they are kept.
        n_walk = np.searchsorted(-counts[by_len], -np.arange(width), side="left")
        ok_t = np.zeros((b_num, width), dtype=bool)
        for r, m in enumerate(n_walk.tolist()):
            cl = cells[:m, r]
            ok = blocked[cl] != stamp
            ok_t[:m, r] = ok
            blocked[cl[ok][:, None] + window] = stamp
        # Keep each order's first g acceptances (in walk order).
        rank = np.cumsum(ok_t, axis=1)
        rr, cc = np.nonzero(ok_t & (rank <= g))
        acc_b, acc_c, acc_slot = by_len[rr], grid.unpad[table[rr, cc] & p_mask], rank[rr, cc] - 1
        out[acc_b, s0 + acc_slot] = acc_c
        if kinds is not None:
            kinds[acc_b, s0 + acc_slot] = KIND_PROXIMITY
        acc_n = np.bincount(acc_b, minlength=b_num)
        # ---- farthest-point fallback --------------------------------------------------------
        need = g - acc_n
        fb = np.flatnonzero(need > 0)
        if fb.size:
            tie_f[row_base[acc_b] + acc_c] = grid.taken  # accepted: out of the fallback's pool
            acc_pos = np.zeros((b_num, g), dtype=np.int64)
            acc_pos[acc_b, acc_slot] = acc_c
            fb = fb[np.argsort(-acc_n[fb], kind="stable")]  # similar rows share a chunk
            for c0 in range(0, fb.size, _FALLBACK_ROWS):  # row chunks that stay in cache
                rows = fb[c0 : c0 + _FALLBACK_ROWS]
                _fallback(grid, out, kinds, tie, skeys, rows, acc_n, acc_pos, need, s0, s0 + g == n)
        s += g
        commit(s0, s)
    return (out, kinds) if return_kinds else out


def _fallback(
    grid: _Grid,
    out: np.ndarray,
    kinds: np.ndarray | None,
    tie: np.ndarray,
    skeys: np.ndarray,
    fb: np.ndarray,
    acc_n: np.ndarray,
    acc_pos: np.ndarray,
    need: np.ndarray,
    s0: int,
    last: bool,
) -> None:
    """Farthest-point fallback of the step starting at output slot ``s0``, for orders ``fb``.

    ``tie`` holds each position's group priority (``grid.taken`` once selected, including this
    step's proximity picks); ``skeys`` the step's uint64 random keys of all orders.  Writes
    ``need[b]`` positions after the ``acc_n[b]`` proximity picks ``acc_pos[b, :acc_n[b]]``.
    """
    n, kd = grid.n, grid.key_dtype
    # Rows in order of the picks still to make, most first (a row with no proximity pick
    # starts from a random position, one pick made): the rows still picking at round t are a
    # prefix, and those with more than j proximity picks a suffix.
    made = (acc_n[fb] == 0).astype(np.int64)
    fb = fb[np.argsort(made - need[fb], kind="stable")]
    nd, na, made = need[fb], acc_n[fb], (acc_n[fb] == 0).astype(np.int64)
    width = int(nd.max())
    rnd = _position_random(skeys[fb], n)
    picks = np.zeros((fb.size, width), dtype=np.int64)
    pick_kind = np.full((fb.size, width), KIND_FARTHEST, dtype=np.int8)
    if last:
        # Only the remaining positions are left: all of them, in candidate-list order.
        grp = tie[fb, :n].astype(np.int64)
        grp = np.where(grp < 0, -1, grp >> (_TIE_BITS - 6))
        picks[:] = np.argsort(-((grp << 32) | rnd), axis=1, kind="stable")[:, :width]
        pick_kind[:] = KIND_REST
    else:
        # key = (squared distance to the nearest position taken in this step) << 20 | priority:
        # its argmax is the farthest remaining position, ties going to the preferred one.
        rnd >>= np.uint32(_TIE_RND_SHIFT)
        prio = tie[fb, :n]
        prio |= rnd.view(np.int32) if kd == np.int32 else rnd.astype(kd)
        first = acc_pos[fb, 0]
        iz = np.flatnonzero(made)
        if iz.size:
            # Nothing accepted in this step: start from a uniformly random remaining position.
            fill = _position_random(_step_keys(skeys[fb[iz]], 0, _SALT_FILL), n).astype(np.int64)
            fill[prio[iz] < 0] = -1
            first[iz] = fill.argmax(axis=1)
            picks[iz, 0] = first[iz]
            pick_kind[iz, 0] = KIND_RANDOM_FILL
        d2 = grid.d2(first)
        n_max = int(na.max())
        if n_max > 1:
            pos = acc_pos[fb, :n_max]
            # na ascends from 2 on (rows with 0 or 1 proximity picks come first, in any order).
            starts = np.searchsorted(na, np.arange(2, n_max + 1), side="left")
            for j, r0 in enumerate(starts.tolist(), start=1):
                np.minimum(d2[r0:], grid.d2(pos[r0:, j]), out=d2[r0:])
        key = d2.astype(kd)
        key <<= _TIE_BITS
        key += prio
        left = nd - made
        n_pick = np.searchsorted(-left, -np.arange(int(left.max(initial=0))), side="left")
        for t, m in enumerate(n_pick.tolist()):
            p = key[:m].argmax(axis=1)
            picks[np.arange(m), made[:m] + t] = p
            if t + 1 < n_pick.size:
                m2 = int(n_pick[t + 1])
                upd = grid.d2_key(p[:m2])
                upd += prio[:m2]
                np.minimum(key[:m2], upd, out=key[:m2])
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

    def fill(
        step_key: np.ndarray, rnd: np.ndarray, group: dict, accepted: list[int], rest: list[int], need: int
    ) -> list[tuple[int, int]]:
        # Farthest-point sampling over the candidate list `rest`.
        if len(rest) <= need:  # no choice left: all of them, in candidate-list order
            return [(c, KIND_REST) for c in rest]
        # Ties between equal distances: candidate-list group (score), then the top bits of the
        # position's random number, then the smaller raster index.
        tie_order = sorted(rest, key=lambda c: (group[c], -(int(rnd[c]) >> _TIE_RND_SHIFT), c))
        tie_rank = {c: j for j, c in enumerate(tie_order)}
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
            c = max(rest, key=lambda c: (min(d2(c, p) for p in pts), -tie_rank[c]))
            rest.remove(c)
            taken.append((c, KIND_FARTHEST))
            pts.append(c)
        return taken

    order = [int(_uniform_index(_splitmix64(okey ^ np.uint64(_SALT_START)), n)[0])]
    kinds = [KIND_START]
    if group_sizes[0] > 1:
        step_key = _step_keys(okey, 0)
        rnd = _position_random(step_key, n)[0]
        rest = sorted((c for c in range(n) if c != order[0]), key=lambda c: (-int(rnd[c]), c))
        g0 = (int(_CODE_VALUE[0] >= proximity_threshold) << 5) | int(_CODE_RANK[0])
        for c, kd in fill(step_key, rnd, dict.fromkeys(rest, g0), order[:1], rest, group_sizes[0] - 1):
            order.append(c)
            kinds.append(kd)
    for k in range(1, len(group_sizes)):
        g = group_sizes[k]
        step_key = _step_keys(okey, k)
        rnd = _position_random(step_key, n)[0]
        done = set(order)
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
    batch_size: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
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
    indices : array of int, optional
        The ``num`` order indices to generate instead of ``start .. start + num - 1``.
    batch_size : int, optional
        Orders generated together (speed/memory trade-off only; the result does not change).
        Default: about half a million grid positions per batch (2048 orders at 16 x 16, 512 at
        32 x 32).

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
    idx_all = _indices(num, start, indices)
    n = grid_size * grid_size
    if batch_size is None:
        batch_size = max(16, min(4096, (1 << 19) // n))
    batch_size = _check_count("batch_size", batch_size, 1)
    out = np.empty((num, n), dtype=np.int64)
    for b0 in range(0, num, batch_size):
        out[b0 : b0 + batch_size] = _lpd_batch(idx_all[b0 : b0 + batch_size], seed, sizes, grid_size, tp, tr)
    return out


def _indices(num: int, start: int, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """The order indices of a call: ``start .. start + num - 1``, or ``indices`` (``num`` of them)."""
    if indices is None:
        return np.arange(start, start + num, dtype=np.int64)
    idx = np.asarray(indices)
    if idx.shape != (num,) or idx.dtype.kind not in "iu" or (idx.size and idx.min() < 0):
        raise ValueError(f"indices must be {num} non-negative integers, got {idx.dtype} {list(idx.shape)}")
    return idx.astype(np.int64)


def random_orders(num: int, grid_size: int, seed: int = 0, start: int = 0,
                  indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
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
    keys = _order_keys(seed, _indices(num, start, indices), _SALT_RANDOM)
    with np.errstate(over="ignore"):
        h = _splitmix64(keys[:, None] ^ (np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN64))[None, :])
    return np.argsort(h, axis=1, kind="stable").astype(np.int64)


def raster_orders(num: int, grid_size: int) -> np.ndarray:
    """Raster orders (row by row, left to right): ``num`` copies of ``0 .. N-1``, int64."""
    num = _check_count("num", num)
    grid_size = _check_count("grid_size", grid_size, 1)
    return np.tile(np.arange(grid_size * grid_size, dtype=np.int64), (num, 1))
