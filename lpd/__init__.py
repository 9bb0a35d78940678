"""LPD: Locality-aware Parallel Decoding for class-conditional image generation.

The library behind the ``main_*.py`` entry points: the transformer (:mod:`lpd.models`), its
KV-cached parallel decoder (:mod:`lpd.sampling`), the VQ tokenizer (:mod:`lpd.tokenizer`),
locality-aware orders (:mod:`lpd.orders`), group-size schedules (:mod:`lpd.schedules`), safe
checkpoint I/O (:mod:`lpd.checkpoint`), metrics, evaluation and training loops.
"""

__version__ = "0.1.0"
