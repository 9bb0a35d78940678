"""``python -m lpd.demo``: the CPU demo."""

import sys

from lpd.demo.run import main

sys.exit(main())
