"""``python -m lpd.demo``: the CPU demo (see :mod:`lpd.demo.run`)."""

import sys

from lpd.demo.run import main

sys.exit(main())
