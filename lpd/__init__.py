"""LPD: Locality-aware Parallel Decoding for class-conditional image generation (README.md lists the modules)."""

__version__ = "0.1.0"
