"""Image tokenizers: the LlamaGen VQ-16 model that maps images to LPD's discrete tokens and back.

``build_vq(**config)`` builds it (defaults: the released ``vq_ds16_c2i.pt``), ``load_vq(path)``
loads that file strictly; ``vq.encode(images) -> [B, H/16, W/16]`` indices and
``vq.decode(tokens) -> [B, 3, 16h, 16w]`` images (unclamped, nominally in [-1, 1]).
"""

from lpd.tokenizer.vq import VQModel, VectorQuantizer, build_vq, load_vq, load_vq_state_dict

__all__ = ["VQModel", "VectorQuantizer", "build_vq", "load_vq", "load_vq_state_dict"]
