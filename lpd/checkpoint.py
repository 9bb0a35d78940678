"""``python -m lpd.checkpoint consolidate|export``: the command line of :mod:`lpd.export`."""

import sys

from lpd.export import main

if __name__ == "__main__":
    sys.exit(main())
