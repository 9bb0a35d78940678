"""Generation orders: locality-aware (LPD, many at once in numpy; orders/README.md describes how), random, raster.
Randomness is a counter-based hash of (seed, order index, step, position): order ``i`` depends only on ``(seed, i)``
and its known mask. Fallback ties left after the released candidate list go to the smaller raster index."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import cache, lru_cache, partial

import numpy as np

from lpd.config import check_seed
from lpd.schedules import GroupSizeError, validate_group_sizes

#: How each position was chosen (``lpd_batch(..., return_kinds=True)``).
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
_CHUNK = 128  # fallback rows per chunk: their arrays stay in cache
_WINDOW_SHARE = 4  # large grids update a pick's box alone when it covers under 1/4 of the grid
_D2_ROWS = 32  # fallback rows whose distances are computed together
_BOX_TABLE_MAX = 23  # boxes up to this side take distances from a [w, w, w, w] table (2.2 MB at 23)
_KEY_PAD = np.iinfo(np.int64).max  # pads the per-order candidate rows; sorts last
_SEL = 100  # proximity code of an already selected position (codes < 25 are unselected)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (array arithmetic wraps around silently)."""
    z = x.astype(np.uint64) + np.uint64(_GOLDEN64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _order_keys(seed: int, idx: np.ndarray, salt: int = 0) -> np.ndarray:
    """One uint64 key per order index, a function of ``(seed, i, salt)`` only."""
    s = _splitmix64(np.array([seed ^ salt], dtype=np.uint64))
    return _splitmix64(s ^ _splitmix64(idx.astype(np.uint64)))


def _step_keys(order_keys: np.ndarray, step: int, salt: int = 0) -> np.ndarray:
    return _splitmix64(order_keys ^ np.uint64((step * _GOLDEN64 + salt) & 0xFFFFFFFFFFFFFFFF))


@cache
def _pos_mult(n: int) -> np.ndarray:
    mult = np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B9) & np.uint64(0xFFFFFFFF)
    return mult.astype(np.uint32)


def _key32(step_keys: np.ndarray) -> np.ndarray:
    return ((step_keys ^ (step_keys >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _hash32(key32: np.ndarray, pos_mult: np.ndarray) -> np.ndarray:
    """uint32 hash of (step key, ``_pos_mult`` of a position), broadcasting; the top bits are the best."""
    h = key32 + pos_mult
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    return h


def _position_random(step_keys: np.ndarray, n: int) -> np.ndarray:
    """uint32 ``[B, n]``: the hash of every position for each of the ``B`` uint64 step keys."""
    return _hash32(_key32(step_keys)[:, None], _pos_mult(n)[None, :])


def _uniform_index(keys: np.ndarray, n: int) -> np.ndarray:
    """An index in ``[0, n)`` per uint64 key (multiply-high)."""
    return ((keys >> np.uint64(32)) * np.uint64(n) >> np.uint64(32)).astype(np.int64)


def _check_count(name: str, v: int, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _check_threshold(name: str, v: float) -> float:
    with contextlib.suppress(TypeError, ValueError):
        if float(v) >= 0:
            return float(v)
    raise ValueError(f"{name} must be a number >= 0, got {v!r}")


def _check_run(num: int, grid_size: int, seed=0, start=0, indices=None) -> tuple:
    """Checked ``num``, ``grid_size``, seed and the order indices: ``start .. start + num - 1``, or ``indices``."""
    grid_size = _check_count("grid_size", grid_size, 1)
    if grid_size > 256:
        raise ValueError(f"grid_size {grid_size} is too large (at most 256 x 256 tokens)")
    num, seed = _check_count("num", num), check_seed(seed, "seed")
    start = _check_count("start", start)
    if indices is None:
        return num, grid_size, seed, np.arange(start, start + num, dtype=np.int64)
    idx = np.asarray(indices)
    if idx.shape != (num,) or idx.dtype.kind not in "iu" or (idx.size and idx.min() < 0):
        raise ValueError(
            f"indices must be {num} non-negative integers, got {idx.dtype} {list(idx.shape)}"
        )
    return num, grid_size, seed, idx.astype(np.int64)


def _known(known: np.ndarray | None, num: int, n: int) -> tuple[np.ndarray | None, int]:
    """``known`` as bool ``[num, n]`` (None when nothing is known) and the unknown positions per row."""
    if known is None:
        return None, n
    k = np.asarray(known)
    if k.dtype != np.bool_ or k.shape not in ((n,), (num, n)):
        raise ValueError(
            f"known must be a bool array [{n}] or [{num}, {n}] (True = already decoded), "
            f"got {k.dtype} {list(k.shape)}"
        )
    counts = n - np.broadcast_to(k, (num, n)).sum(axis=1)
    if num == 0:  # no rows: any count (-1) for a 2-D mask
        return None, (n - int(k.sum()) if k.ndim == 1 else -1)
    odd = np.flatnonzero(counts != counts[0])
    if odd.size:
        raise ValueError(
            f"known: row {odd[0]} leaves {counts[odd[0]]} positions unknown but row 0 leaves "
            f"{counts[0]}; every row must leave the same number"
        )
    if counts[0] == 0:
        raise ValueError("known marks every position as decoded: nothing is left to order")
    return (None if counts[0] == n else np.broadcast_to(k, (num, n))), int(counts[0])


def default_batch_size(n: int) -> int:
    """Orders generated together by default: about half a million grid positions."""
    return max(16, min(4096, (1 << 19) // n))


_INV_SQRT2 = 1.0 / math.sqrt(2.0)
# Proximity codes: 5 * (edge neighbours selected) + (diagonal neighbours selected), 0..24.
_CODE_VALUE = np.array([a + b * _INV_SQRT2 for a in range(5) for b in range(5)])
_CODE_RANK = np.empty(25, dtype=np.int64)  # walk rank of a code: 0 for the highest score
_CODE_RANK[np.argsort(-_CODE_VALUE, kind="stable")] = np.arange(25)
# Fallback tie priority (larger first), 20 bits: 6 of the released candidate-list group, 14 of the random number.
_TIE_BITS = 20
_TIE_RND_SHIFT = 32 - (_TIE_BITS - 6)
_HIGH_TOP = 31 << (_TIE_BITS - 6)  # tie priority of a proximity candidate of walk rank 0


class _Grid:
    """Per-(grid, repulsion radius) lookup tables, built once and cached."""

    def __init__(self, g: int, radius: int) -> None:
        self.g, self.n = g, g * g
        n, self._boxes = self.n, {}
        self.rows, self.cols = rows, cols = np.divmod(np.arange(n), g)
        # 8-neighbourhood: neighbour index [n, 8] (n = outside the grid) and code increment.
        dy, dx = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]).T
        r, c = rows[:, None] + dy, cols[:, None] + dx
        self.nbr8 = np.where((r >= 0) & (r < g) & (c >= 0) & (c < g), r * g + c, n)
        self.nbr8_delta = np.where((dy == 0) | (dx == 0), 5, 1).astype(np.uint8)
        p = g + 2 * radius  # repulsion windows live in a grid padded by `radius` on every side
        self.padded_cells = p * p
        self.pidx = (rows + radius) * p + (cols + radius)
        self.unpad = np.zeros(p * p, dtype=np.int64)  # raster index of a padded cell
        self.unpad[self.pidx] = np.arange(n)
        dy, dx = np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1))
        self.window = (dy * p + dx).ravel()
        self.key_dtype = np.int32 if g <= _INT32_KEY_MAX_G else np.int64  # d2 << 20 | priority
        assert g > _INT32_KEY_MAX_G or (2 * (g - 1) ** 2 + 1) << _TIE_BITS < 2**31
        self.taken = -(2**31) if self.key_dtype == np.int32 else -(2**62)
        self.tables = n <= _TABLE_MAX_N  # int16 [n, n] d2 tables and their keys
        if self.tables:
            d2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
            self._d2, self._d2_key = d2.astype(np.int16), (d2 << _TIE_BITS).astype(self.key_dtype)
        else:  # [g, g] squared coordinate differences: d2 = row part + column part
            sq = (np.arange(g)[:, None] - np.arange(g)[None, :]) ** 2
            self._sq, self._sq_key = sq.astype(np.int16), (sq << _TIE_BITS).astype(self.key_dtype)

    def _separable(self, table: np.ndarray, q: np.ndarray) -> np.ndarray:
        rows, cols = table[self.rows[q]][:, :, None], table[self.cols[q]][:, None, :]
        return (rows + cols).reshape(len(q), self.n)

    def d2(self, q: np.ndarray) -> np.ndarray:
        """Squared Euclidean distances from positions ``q`` ([B]) to all positions ([B, n])."""
        return self._d2[q] if self.tables else self._separable(self._sq, q)

    def d2_key(self, q: np.ndarray) -> np.ndarray:
        return self._d2_key[q] if self.tables else self._separable(self._sq_key, q)

    def _box_keys(self, w: int) -> np.ndarray:
        """``[w, w, w, w]``: the d2 key of cell ``(i, j)`` of a box from its cell ``(a, b)``."""
        if w not in self._boxes:
            d = (np.arange(w)[None, :] - np.arange(w)[:, None]) ** 2
            box = (d[:, None, :, None] + d[None, :, None, :]).astype(self.key_dtype)
            self._boxes[w] = box << _TIE_BITS
        return self._boxes[w]

    def row_maxima(self, key: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Large grids: each grid row's maximum and its first column, per row of ``key``."""
        if self.tables:
            return None
        k3 = key.reshape(len(key), self.g, self.g)
        arg = k3.argmax(axis=2)
        return np.take_along_axis(k3, arg[..., None], axis=2)[..., 0], arg

    def farthest(self, key: np.ndarray, maxima: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
        """``key.argmax(axis=1)`` (the first maximum in raster order), by way of ``maxima``."""
        if maxima is None:
            return key.argmax(axis=1)
        r = maxima[0].argmax(axis=1)
        return r * self.g + maxima[1][np.arange(len(r)), r]

    def add_pick(self, key: np.ndarray, prio: np.ndarray, p: np.ndarray, maxima) -> None:
        """``key = min(key, d2_key(p) + prio)`` for fallback keys ``[m, n]`` and picks ``p``, and
        their grid-row ``maxima``. Only the box of radius ``sqrt(d2(p))`` around ``p`` can change
        (no position is farther from the step's picks than ``p``, the farthest): large grids
        update that box alone, and the maxima of the rows whose maximum fell."""
        m, g = len(p), self.g
        r = math.isqrt(max(int(key[np.arange(m), p].max() >> _TIE_BITS) - 1, 0))
        w = 2 * r + 1
        if self.tables or w * w * _WINDOW_SHARE > self.n:
            upd = self.d2_key(p)
            upd += prio
            np.minimum(key, upd, out=key)
            if maxima is not None:
                maxima[0][:], maxima[1][:] = self.row_maxima(key)
            return
        pr, pc, b, last = self.rows[p], self.cols[p], np.arange(m), g - w
        r0, c0 = np.minimum(np.maximum(pr - r, 0), last), np.minimum(np.maximum(pc - r, 0), last)
        if w <= _BOX_TABLE_MAX:
            upd = self._box_keys(w)[pr - r0, pc - c0]
        else:
            sq = _strided(self._sq_key, (g, last + 1, w), 1, 1)
            upd = sq[pr, r0][:, :, None] + sq[pc, c0][:, None, :]
        upd += _strided(prio, (m, last + 1, last + 1, w, w), g, 1, g, 1)[b, r0, c0]
        kv = _strided(key, (m, last + 1, last + 1, w, w), g, 1, g, 1)
        np.minimum(upd, kv[b, r0, c0], out=upd)
        kv[b, r0, c0] = upd
        # the box's rows whose maximum fell (the key at its column is below the stored maximum)
        k3, ri = key.reshape(m, g, g), r0[:, None] + np.arange(w)
        bi = np.broadcast_to(b[:, None], ri.shape)
        fell = k3[bi, ri, maxima[1][bi, ri]] < maxima[0][bi, ri]
        bi, ri = bi[fell], ri[fell]
        line = k3[bi, ri]
        maxima[1][bi, ri] = a = line.argmax(axis=1)
        maxima[0][bi, ri] = line[np.arange(len(a)), a]


def _strided(a: np.ndarray, shape: tuple[int, ...], *steps: int) -> np.ndarray:
    """A writable view of the C-contiguous ``a``: axis 0 steps as in ``a``, the others by ``steps``
    elements."""
    return np.ndarray(shape, a.dtype, a, 0, (a.strides[0], *(k * a.itemsize for k in steps)))


_grid = lru_cache(maxsize=16)(_Grid)


@lru_cache(maxsize=16)
def _code_tables(proximity_threshold: float, taken: int) -> np.ndarray:
    """Fallback tie priority of proximity codes 0..255: ``(63 - ((score >= τp) << 5 | walk rank)) << 14``, or taken."""
    tie = np.full(256, taken, dtype=np.int64)
    group = ((_CODE_VALUE >= proximity_threshold).astype(np.int64) << 5) | _CODE_RANK
    tie[:25] = (63 - group) << (_TIE_BITS - 6)
    return tie


def lpd_batch(
    idx: np.ndarray,
    seed: int,
    group_sizes: Sequence[int],
    grid_size: int,
    proximity_threshold: float,
    repulsion_threshold: float,
    return_kinds: bool = False,
    known: np.ndarray | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """LPD orders of the indices ``idx`` (checked inputs), int64 ``[len(idx), unknown positions]``, and with
    ``return_kinds`` int8 codes of how each position was chosen (:data:`ORDER_KINDS`)."""
    # Chebyshev distances on the grid are integers below grid_size: clamp the window radius.
    grid = _grid(grid_size, int(math.floor(min(repulsion_threshold, grid_size - 1))))
    n, b_num = grid.n, len(idx)
    m = n if known is None else n - int(known[0].sum())
    tie_t = _code_tables(proximity_threshold, grid.taken).astype(grid.key_dtype)
    out = np.empty((b_num, m), dtype=np.int64)
    kinds = np.empty((b_num, m), dtype=np.int8) if return_kinds else None
    rows_b, okeys = np.arange(b_num), _order_keys(seed, idx)
    row_base = rows_b * (n + 1)
    # Per order and position (+ column n, outside the grid): proximity code (_SEL once selected) and fallback tie
    # priority (grid.taken once selected); the proximity candidates (score >= τp) have 0 <= tie <= _HIGH_TOP.
    code_f = np.zeros(b_num * (n + 1), dtype=np.uint8)
    tie = np.full((b_num, n + 1), tie_t[0], dtype=grid.key_dtype)
    tie[:, n] = grid.taken
    tie_f, tie_u = tie.reshape(-1), tie.view(np.uint32 if grid.key_dtype == np.int32 else np.uint64)
    pp, window, pos_mult = grid.padded_cells, grid.window, _pos_mult(n)
    blocked = np.zeros(b_num * pp, dtype=np.uint8)  # stamp of the step that blocked a cell
    pbits = max(1, int(pp - 1).bit_length())
    p_mask = (1 << pbits) - 1

    def commit(new_pos: np.ndarray) -> None:  # new_pos [B, g] are now selected
        new = row_base[:, None] + new_pos
        code_f[new] = _SEL
        touched = grid.nbr8[new_pos]  # [B, g, 8]
        touched += row_base[:, None, None]
        touched = touched.reshape(-1)
        np.add.at(code_f, touched, np.broadcast_to(grid.nbr8_delta, (new.size, 8)).reshape(-1))
        tie_f[touched] = tie_t[code_f[touched]]
        tie[:, n] = grid.taken
        tie_f[new] = grid.taken

    s, fallback = 0, partial(_fallback, grid, out, kinds, tie)
    if known is not None:  # every step follows the proximity rule, around the known positions
        commit(np.nonzero(known)[1].reshape(b_num, n - m))
    else:  # step 0: one uniformly random position
        out[:, 0] = _uniform_index(_splitmix64(okeys ^ np.uint64(_SALT_START)), n)
        if kinds is not None:
            kinds[:, 0] = KIND_START
        s = g = group_sizes[0]
        if g > 1:  # no released schedule: the farthest-point rule around the first position
            tie_f[row_base + out[:, 0]] = grid.taken
            one = np.ones(b_num, dtype=np.int64)  # picks made so far
            fallback(_step_keys(okeys, 0), rows_b, one, out[:, :1].copy(), g - one, 0, g == n)
        commit(out[:, :s])

    for k in range(0 if known is not None else 1, len(group_sizes)):
        g, s0, skeys, stamp = group_sizes[k], s, _step_keys(okeys, k), k % 255 + 1
        if stamp == 1 and k:
            blocked.fill(0)
        # Proximity candidates; sort key: walk rank (from the tie priority), random number (larger first), cell.
        flat = np.flatnonzero(tie_u <= _HIGH_TOP)
        starts = np.searchsorted(flat, row_base)
        counts = np.diff(np.append(starts, flat.size))
        b_of = np.repeat(rows_b, counts)
        c_of = flat - row_base[b_of]
        rnd = _hash32(_key32(skeys)[b_of], pos_mult[c_of])
        keys = (_HIGH_TOP - tie_f[flat]).astype(np.int64)
        keys <<= pbits + 32 - (_TIE_BITS - 6)
        keys |= (~rnd).astype(np.int64) << pbits
        keys |= grid.pidx[c_of]
        # One sorted row per order, longest first (the orders still walking at rank r are a prefix), padded.
        width = int(counts.max(initial=0))
        by_len = np.argsort(-counts, kind="stable")
        row_of = np.empty(b_num, dtype=np.int64)
        row_of[by_len] = rows_b
        table = np.full((b_num, width), _KEY_PAD, dtype=np.int64)
        table.reshape(-1)[np.arange(flat.size) + (row_of * width - starts)[b_of]] = keys
        table.sort(axis=1)
        cells = table & p_mask
        cells += (by_len * pp)[:, None]
        # The walk: rank r of every order at once; only the first g acceptances are kept.
        n_walk = np.searchsorted(-counts[by_len], -np.arange(width), side="left")
        ok_t = np.zeros((b_num, width), dtype=bool)
        for r, mr in enumerate(n_walk.tolist()):
            cl = cells[:mr, r]
            ok = blocked[cl] != stamp
            ok_t[:mr, r] = ok
            blocked[cl[ok][:, None] + window] = stamp
        rank = np.cumsum(ok_t, axis=1)
        rr, cc = np.nonzero(ok_t & (rank <= g))
        acc_b, acc_c, acc_slot = by_len[rr], grid.unpad[table[rr, cc] & p_mask], rank[rr, cc] - 1
        out[acc_b, s0 + acc_slot] = acc_c
        if kinds is not None:
            kinds[acc_b, s0 + acc_slot] = KIND_PROXIMITY
        acc_n = np.bincount(acc_b, minlength=b_num)
        need = g - acc_n
        fb = np.flatnonzero(need > 0)
        if fb.size:  # the farthest-point fallback
            tie_f[row_base[acc_b] + acc_c] = grid.taken  # accepted: out of the fallback's pool
            acc_pos = np.zeros((b_num, g), dtype=np.int64)
            acc_pos[acc_b, acc_slot] = acc_c
            fb = fb[np.argsort(-acc_n[fb], kind="stable")]  # similar rows share a chunk
            for c in range(0, fb.size, _CHUNK):
                fallback(skeys, fb[c : c + _CHUNK], acc_n, acc_pos, need, s0, s0 + g == m)
        s += g
        commit(out[:, s0:s])
    return (out, kinds) if return_kinds else out


def _fallback(grid: _Grid, out, kinds, tie, skeys, fb, acc_n, acc_pos, need, s0: int, last: bool):
    """Farthest-point fallback of the step at output slot ``s0``: ``need[b]`` picks of the orders ``fb`` after
    their ``acc_n[b]`` proximity picks ``acc_pos[b, :acc_n[b]]``."""
    n, kd = grid.n, grid.key_dtype
    # Rows by picks still to make, most first (a row with no proximity pick starts from a random
    # position): the rows still picking at round t are a prefix, those with more than j picks a suffix.
    fb = fb[np.argsort((acc_n[fb] == 0) - need[fb], kind="stable")]
    nd, na, made = need[fb], acc_n[fb], (acc_n[fb] == 0).astype(np.int64)
    width = int(nd.max())
    rnd = _position_random(skeys[fb], n)
    picks = np.zeros((fb.size, width), dtype=np.int64)
    pick_kind = np.full((fb.size, width), KIND_REST if last else KIND_FARTHEST, dtype=np.int8)
    if last:  # only the remaining positions are left: all of them, in candidate-list order
        grp = np.where(tie[fb, :n] < 0, -1, tie[fb, :n].astype(np.int64) >> (_TIE_BITS - 6))
        picks[:] = np.argsort(-((grp << 32) | rnd), axis=1, kind="stable")[:, :width]
    else:
        # key = squared distance to this step's nearest pick << 20 | priority: argmax = farthest, then preferred.
        rnd >>= np.uint32(_TIE_RND_SHIFT)
        prio = tie[fb, :n]
        prio |= rnd.view(np.int32) if kd == np.int32 else rnd.astype(kd)
        first = acc_pos[fb, 0]
        iz = np.flatnonzero(made)
        if iz.size:  # nothing accepted in this step: start from a random remaining position
            fill = _position_random(_step_keys(skeys[fb[iz]], 0, _SALT_FILL), n).astype(np.int64)
            fill[prio[iz] < 0] = -1
            first[iz] = fill.argmax(axis=1)
            picks[iz, 0] = first[iz]
            pick_kind[iz, 0] = KIND_RANDOM_FILL
        d2 = np.empty((fb.size, n), dtype=np.int16)
        for a in range(0, fb.size, _D2_ROWS):  # row blocks that stay in cache
            z = min(a + _D2_ROWS, fb.size)
            d2[a:z] = grid.d2(first[a:z])
            # na ascends from 2 on (rows with 0 or 1 proximity picks come first, in any order).
            starts = np.searchsorted(na[a:z], np.arange(2, int(na[a:z].max()) + 1)) + a
            for j, r0 in enumerate(starts.tolist(), 1):
                np.minimum(d2[r0:z], grid.d2(acc_pos[fb[r0:z], j]), out=d2[r0:z])
        key = d2.astype(kd)
        key <<= _TIE_BITS
        key += prio
        left = nd - made
        n_pick = np.searchsorted(-left, -np.arange(int(left.max(initial=0))), side="left")
        maxima = grid.row_maxima(key)
        for t, m in enumerate(n_pick.tolist()):
            p = grid.farthest(key[:m], None if maxima is None else (maxima[0][:m], maxima[1][:m]))
            picks[np.arange(m), made[:m] + t] = p
            if t + 1 < n_pick.size:
                m2 = int(n_pick[t + 1])
                top = None if maxima is None else (maxima[0][:m2], maxima[1][:m2])
                grid.add_pick(key[:m2], prio[:m2], p[:m2], top)
    took = np.arange(width)[None, :] < nd[:, None]
    r_idx = np.broadcast_to(fb[:, None], took.shape)[took]
    c_idx = (s0 + na[:, None] + np.arange(width)[None, :])[took]
    out[r_idx, c_idx] = picks[took]
    if kinds is not None:
        kinds[r_idx, c_idx] = pick_kind[took]


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
    known: np.ndarray | None = None,
) -> np.ndarray:
    """Locality-aware orders ``start .. start + num - 1`` (or ``indices``) of a run, int64 ``[num, N]``.

    Step 0 takes one random position (a larger first group: the rest by the farthest-point rule); a proximity pick
    needs a score >= τp (``proximity_threshold``); no two picks of a step lie within Chebyshev distance τr
    (``repulsion_threshold``: 2.0 at 256 px, 3.0 for XXL-256, 4.0 at 512 px). Row ``i`` depends only on ``(seed, i)``;
    ``batch_size`` changes speed only. ``known`` (bool ``[N]`` or ``[num, N]``, True = decoded, the same count per
    row): the rows hold the unknown positions, ``group_sizes`` sum to their number, step 0 follows proximity too.
    """
    num, grid_size, seed, idx_all = _check_run(num, grid_size, seed, start, indices)
    tp = _check_threshold("proximity_threshold", proximity_threshold)
    tr = _check_threshold("repulsion_threshold", repulsion_threshold)
    n = grid_size * grid_size
    known, m = _known(known, num, n)
    sizes = validate_group_sizes(group_sizes, n if m == n else None)
    m = sum(sizes) if m < 0 else m
    if sum(sizes) != m:
        raise GroupSizeError(
            f"group sizes sum to {sum(sizes)} but {m} positions are not known; the groups must cover "
            f"each unknown position once (lpd.schedules.scaled_group_sizes makes such a schedule)"
        )
    bs = _check_count("batch_size", default_batch_size(n) if batch_size is None else batch_size, 1)
    out = np.empty((num, m), dtype=np.int64)
    for b in (slice(b0, b0 + bs) for b0 in range(0, num, bs)):
        part = None if known is None else known[b]
        out[b] = lpd_batch(idx_all[b], seed, sizes, grid_size, tp, tr, known=part)
    return out


def random_orders(
    num: int,
    grid_size: int,
    seed: int = 0,
    start: int = 0,
    indices: Sequence[int] | np.ndarray | None = None,
    known: np.ndarray | None = None,
) -> np.ndarray:
    """Uniformly random orders, int64 ``[num, N]`` (of the unknown positions with ``known``, as in lpd_orders)."""
    num, grid_size, seed, idx = _check_run(num, grid_size, seed, start, indices)
    n = grid_size * grid_size
    known, m = _known(known, num, n)
    keys = _order_keys(seed, idx, _SALT_RANDOM)
    h = _splitmix64(keys[:, None] ^ (np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN64))[None, :])
    out = np.argsort(h, axis=1, kind="stable").astype(np.int64)
    return out if known is None else out[~np.take_along_axis(known, out, axis=1)].reshape(num, m)


def raster_orders(num: int, grid_size: int) -> np.ndarray:
    """Raster orders (row by row, left to right): ``num`` copies of ``0 .. N-1``, int64."""
    num, grid_size, _, _ = _check_run(num, grid_size)
    return np.tile(np.arange(grid_size * grid_size, dtype=np.int64), (num, 1))
