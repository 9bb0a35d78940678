"""``python -m lpd.orders``: write order files or draw an order (see :mod:`lpd.orders.cli`)."""

from lpd.orders.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
