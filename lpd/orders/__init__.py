"""Generation orders: locality-aware, random and raster; the released JSON order files; statistics."""

from lpd.orders.files import OrderFileError, load_orders, save_orders
from lpd.orders.generate import ORDER_KINDS, lpd_orders, random_orders, raster_orders
from lpd.orders.stats import RELEASED_STATISTICS, order_statistics
from lpd.schedules import group_sizes

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
]
