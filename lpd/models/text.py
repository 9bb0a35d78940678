"""The text condition of an LPD model: caption features ``[B, L, text_dim]`` become prefix rows
``[B, L, D]`` through a projector MLP plus the rows' own learned position embeddings; a learned
null caption (one row) stands for no caption in guidance and in caption dropout."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["TextPrefix"]


class TextPrefix(nn.Module):
    """Caption projector ``text_dim -> dim -> dim`` (GELU), ``max_tokens`` row positions and the
    null caption."""

    def __init__(self, text_dim: int, dim: int, max_tokens: int):
        super().__init__()
        self.max_tokens = max_tokens
        self.proj = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU("tanh"), nn.Linear(dim, dim))
        self.pos = nn.Parameter(torch.zeros(1, max_tokens, dim))
        self.null = nn.Parameter(torch.zeros(1, dim))

    def forward(
        self,
        features: Tensor | None,
        mask: Tensor | None = None,
        drop: Tensor | None = None,
        batch: int = 1,
    ) -> tuple[Tensor, Tensor]:
        """``(rows [B, L, D], mask [B, L] bool)`` of ``features`` (``mask``: False = padding; None:
        all valid); None features: the null caption ``[batch, 1, D]``; ``drop [B]`` bool: those
        captions replaced by the null one."""
        if features is None:
            null = self.null.expand(batch, -1)[:, None]
            return null, torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        (B, L, C), width = features.shape, self.proj[0].in_features
        if L > self.max_tokens or C != width:
            raise ValueError(
                f"caption features must be [B, L <= {self.max_tokens}, {width}] (max_text_tokens, "
                f"text_dim), got {list(features.shape)}"
            )
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=features.device)
        elif mask.shape != (B, L) or mask.dtype != torch.bool:
            got = f"{mask.dtype} {list(mask.shape)}"
            raise ValueError(
                f"the caption mask must be bool [{B}, {L}] (False: padding), got {got}"
            )
        rows = self.proj(features.to(self.pos.dtype)) + self.pos[:, :L]
        if drop is not None:
            if L == 0:
                rows, mask = rows.new_zeros(B, 1, rows.shape[-1]), mask.new_zeros(B, 1)
            first = torch.arange(rows.shape[1], device=rows.device) == 0
            null = torch.where(first[:, None], self.null.to(rows.dtype), 0.0)
            rows = torch.where(drop[:, None, None], null, rows)
            mask = torch.where(drop[:, None], first, mask)
        return rows, mask
