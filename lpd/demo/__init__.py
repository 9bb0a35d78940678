"""The CPU demo (``python -m lpd.demo``): embedded handwritten digits as 16x16 palette token grids
(:mod:`~lpd.demo.digits`, :mod:`~lpd.demo.palette`), a digit classifier that judges samples
(:mod:`~lpd.demo.classifier`) and the order x steps ablation (:mod:`~lpd.demo.run`)."""
