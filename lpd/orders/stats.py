"""How local a set of orders is: context support (mean number of 8-neighbours decoded in earlier steps, over
tokens of steps >= 1), group spread (mean over groups of two or more of the smallest Chebyshev distance inside the
group) and close pairs (share of same-group token pairs, pooled, at Chebyshev distance <= repulsion_threshold)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lpd.orders.files import check_order_rows
from lpd.schedules import validate_group_sizes

#: The released generator (300 orders at 256 px / 20 steps, 40 at 512 px / 48) and random orders.
RELEASED_STATISTICS = {
    "256/20 tau_r=2": {"context_support": 3.570, "group_spread": 3.667, "close_pairs": 0.041},
    "512/48 tau_r=4": {"context_support": 3.793, "group_spread": 6.274, "close_pairs": 0.034},
    "random 256/20 tau_r=2": {"context_support": 3.43, "group_spread": 1.62, "close_pairs": 0.080},
}


def order_statistics(
    orders: np.ndarray, group_sizes: Sequence[int], grid_size: int, repulsion_threshold: float
) -> dict[str, float]:
    """Statistics of ``orders`` ``[num, grid_size**2]`` split by ``group_sizes``; ``nan`` where undefined."""
    orders = check_order_rows(np.asarray(orders), len(orders), grid_size, "orders")
    n, g, num = grid_size * grid_size, grid_size, len(orders)
    sizes = validate_group_sizes(group_sizes, n)
    # Step at which each raster position is decoded, on a grid padded with "never".
    step_grid = np.full((num, g + 2, g + 2), len(sizes), dtype=np.int64)
    centre = step_grid[:, 1:-1, 1:-1]
    steps = np.repeat(np.arange(len(sizes)), sizes)[np.argsort(orders, axis=1)]
    centre[...] = steps.reshape(num, g, g)
    shifts = [(y, x) for y in (-1, 0, 1) for x in (-1, 0, 1) if y or x]
    support = sum(step_grid[:, 1 + y : 1 + y + g, 1 + x : 1 + x + g] < centre for y, x in shifts)
    later = centre >= 1
    context = float(support[later].mean()) if later.any() else float("nan")
    rows, cols = np.divmod(orders, g)
    spreads, close, pairs = [], 0, 0
    for s0, k in zip(np.cumsum([0] + sizes).tolist(), sizes):
        if k >= 2:
            r, c = rows[:, s0 : s0 + k], cols[:, s0 : s0 + k]
            d = np.maximum(abs(r[:, :, None] - r[:, None, :]), abs(c[:, :, None] - c[:, None, :]))
            iu, ju = np.triu_indices(k, 1)
            du = d[:, iu, ju]
            spreads.append(du.min(axis=1))
            close += int((du <= repulsion_threshold).sum())
            pairs += du.size
    spread = float(np.concatenate(spreads).mean()) if spreads else float("nan")
    close = close / pairs if pairs else float("nan")
    return {"context_support": context, "group_spread": spread, "close_pairs": close}
