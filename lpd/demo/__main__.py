"""``python -m lpd.demo``: the CPU demo (``--task t2i``: the text-to-image testbed)."""

import sys

from lpd.demo.run import main

if sys.argv[1:3] == ["--task", "t2i"] or sys.argv[1:2] == ["--task=t2i"]:
    from lpd.demo.t2i import main as t2i_main

    sys.exit(t2i_main(sys.argv[2 + (sys.argv[1] == "--task") :]))
sys.exit(main())
