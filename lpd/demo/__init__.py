"""The CPU demo's data side: embedded handwritten digits as token grids and a digit classifier.

* :mod:`lpd.demo.digits` — the 1,797 scikit-learn digits shipped in ``lpd/data/digits.npz``,
  upsampled to a 16x16 grid (the 256 px token grid) and quantised to the palette tokenizer's
  grey levels (:mod:`lpd.demo.palette`), with a fixed stratified held-out split.
* :mod:`lpd.demo.classifier` — a tiny CNN trained on the training split in seconds; it scores
  generated digits (class accuracy) and serves as the feature extractor for a Fréchet distance.
"""
