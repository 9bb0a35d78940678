"""The app's model as the page shows it (tokenizer, class names, default settings) and decoding
step by step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpd.evaluate import image_seed
from lpd.images import to_uint8
from lpd.sampling import Decoder, SamplingConfig

__all__ = [
    "AppModel",
    "class_names",
    "decode_steps",
    "render_partial",
]


@dataclass
class AppModel:
    """A model and its tokenizer as the page shows them; ``condition``: ``class`` or ``text``."""

    model: torch.nn.Module
    tokenizer: torch.nn.Module
    name: str
    class_names: list[str]
    condition: str = "class"
    cfg: float = 4.0  # defaults of the page; steps 20
    repulsion_threshold: float = 2.0
    bf16: bool = False
    text_encoder: Any = None  # a text model's recorded encoder

    @property
    def device(self) -> torch.device:
        return self.model.pos_embed.device

    @property
    def patch(self) -> int:
        return int(getattr(self.tokenizer, "downsample_factor", 16))

    def sampling(self, **changes) -> SamplingConfig:
        return SamplingConfig(
            cfg=self.cfg, repulsion_threshold=self.repulsion_threshold, bf16=self.bf16
        ).replace(**changes)


def class_names(class_num: int) -> list[str]:
    """Digits for 10 classes, ImageNet's (torchvision's list) for 1,000, else ``class k``."""
    if class_num == 10:
        return [str(d) for d in range(10)]
    if class_num == 1000:
        from torchvision.models import ResNet18_Weights

        return [
            f"{k}: {name}"
            for k, name in enumerate(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
        ]
    return [f"class {k}" for k in range(class_num)]


def decode_steps(
    app: AppModel,
    label: int | tuple[torch.Tensor, torch.Tensor],
    order: np.ndarray,
    group_sizes: Sequence[int],
    sampling: SamplingConfig,
    seed: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(step, tokens [1, N])`` after each step: raster tokens, -1 where not decoded;
    ``label``: a class or a caption ``(features [1, L, C], mask [1, L])``.

    The draw is image 0 of a ``seed`` run, so the last step's tokens are ``LPDPipeline``'s (and
    ``sample_tokens``') for the same settings.
    """
    device, N = app.device, app.model.grid_size**2
    decoder = Decoder(app.model, sampling)
    orders = torch.as_tensor(order, device=device).long().view(1, N)
    if isinstance(label, tuple):
        prefix, mask = decoder.text_prefix(*(t.to(device) for t in label))
    else:
        prefix, mask = decoder.class_prefix(torch.tensor([label], device=device), 1), None
    gen = [torch.Generator().manual_seed(image_seed(seed, 0))]
    known = torch.full((1, N), -1, dtype=torch.long, device=device)
    steps = decoder.steps(prefix, orders, list(group_sizes), prefix_mask=mask, generator=gen)
    for k, step in enumerate(steps):
        known[0, orders[0, step.first : step.last]] = step.tokens[0, step.first : step.last]
        yield k, known.clone()


def render_partial(app: AppModel, tokens: torch.Tensor, grey: int = 128) -> np.ndarray:
    """uint8 ``[H, W, 3]`` preview of raster ``tokens [1, N]``, tokens -1 painted grey."""
    g = app.model.grid_size
    unknown = (tokens[0] < 0).cpu().numpy().reshape(g, g)
    amp = torch.autocast(app.device.type, dtype=torch.bfloat16, enabled=app.bf16)
    with torch.no_grad(), amp:
        pixels = to_uint8(app.tokenizer.decode(tokens.clamp(min=0).view(1, g, g)))[0]
    cover = np.kron(unknown, np.ones((app.patch, app.patch), dtype=bool))
    return np.where(cover[:, :, None], np.uint8(grey), pixels)
