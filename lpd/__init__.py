"""LPD: Locality-aware Parallel Decoding for class-conditional image generation.

The library behind the ``main_*.py`` entry points; README.md lists its modules.
"""

__version__ = "0.1.0"
