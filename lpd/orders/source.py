"""Order ``i`` of a run: generated from ``(seed, i)``, the raster order, or row ``i`` of a table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lpd.config import check_order
from lpd.orders.files import check_order_rows
from lpd.orders.generate import lpd_orders, random_orders, raster_orders


class OrderSource:
    """Orders of image indices for one run: ``kind`` lpd / random / raster, or rows of ``table``."""

    def __init__(
        self,
        kind: str,
        group_sizes: Sequence[int],
        grid_size: int,
        *,
        seed: int = 0,
        proximity_threshold: float = 1.0,
        repulsion_threshold: float = 1.0,
        table: np.ndarray | None = None,
    ):
        self.kind, self.grid_size, self.seed = check_order(kind, "order"), int(grid_size), int(seed)
        self.group_sizes = list(group_sizes)
        self.tp, self.tr = float(proximity_threshold), float(repulsion_threshold)
        if table is not None:
            table = check_order_rows(np.asarray(table), len(table), self.grid_size, "order table")
        self.table = table

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Orders of the image ``indices``, int64 ``[len(indices), N]``."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.table is not None:
            if idx.size and idx.max() >= len(self.table):
                raise ValueError(
                    f"the order table has {len(self.table)} rows; image {int(idx.max())} needs more"
                )
            return self.table[idx]
        if self.kind == "raster":
            return raster_orders(idx.size, self.grid_size)
        if self.kind == "random":
            return random_orders(idx.size, self.grid_size, seed=self.seed, indices=idx)
        sizes, grid, seed = self.group_sizes, self.grid_size, self.seed
        return lpd_orders(idx.size, sizes, grid, self.tp, self.tr, seed=seed, indices=idx)
