"""Generation orders for LPD: locality-aware (spec section 5), random and raster.

The public API:

* :func:`lpd_orders` - locality-aware orders, vectorised, deterministic per ``(seed, i)``;
* :func:`random_orders`, :func:`raster_orders` - the baselines;
* :func:`load_orders` / :func:`save_orders` - the released JSON order-file format, validated;
* :func:`order_statistics` - context support, group spread and close pairs of a set of orders;
* :func:`group_sizes` - the group-size schedule for a resolution and step count (from
  :mod:`lpd.schedules`).

``python -m lpd.orders --help`` writes order files and pictures of orders.
"""

from lpd.orders.files import OrderFileError, load_orders, save_orders
from lpd.orders.generate import ORDER_KINDS, lpd_orders, random_orders, raster_orders
from lpd.orders.stats import RELEASED_STATISTICS, order_statistics
from lpd.schedules import group_sizes, training_schedules

__all__ = [
    "lpd_orders",
    "random_orders",
    "raster_orders",
    "load_orders",
    "save_orders",
    "OrderFileError",
    "order_statistics",
    "RELEASED_STATISTICS",
    "ORDER_KINDS",
    "group_sizes",
    "training_schedules",
]
