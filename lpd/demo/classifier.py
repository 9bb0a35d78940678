"""A tiny digit classifier: the CPU demo's quality judge and Fréchet-distance feature extractor.

:class:`DigitClassifier` is a small CNN (three 3x3 convolutions, two of stride 2, then two
linear layers; 47k parameters) on the ``16 x 16`` grid of grey intensities (one value per token
cell, in ``[0, 1]``). :func:`train_classifier` fits it on the training split of
:mod:`lpd.demo.digits` in about 2 s on one CPU thread (held-out accuracy about 0.98). It then plays the roles Inception
plays for ImageNet:

* class accuracy of generated digits: :func:`accuracy` on token grids, or the logits of
  :meth:`DigitClassifier.features` on decoded images;
* a Fréchet distance in its feature space: :meth:`DigitClassifier.features` maps uint8 images
  ``[B, 3, H, W]`` to ``(features [B, feature_dim], logits [B, 10])``, the extractor signature the
  evaluation metrics take.

Images are reduced to the grid by averaging each cell (and the RGB channels), so decoded palette
images and token grids give the network bit-identical inputs. Training on the CPU is bit-for-bit
deterministic for a given seed and thread count (one thread by default) and leaves the global
random state untouched.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from lpd.demo.digits import DEFAULT_GRID_SIZE, NUM_CLASSES, load_digits_dataset
from lpd.demo.palette import DEFAULT_LEVELS, PaletteTokenizer, images_to_uint8

__all__ = ["DigitClassifier", "accuracy", "train_classifier"]


class DigitClassifier(nn.Module):
    """CNN over a ``grid_size x grid_size`` intensity grid (``grid_size`` divisible by 4).

    Args:
        levels: palette levels of the token grids it reads (:meth:`tokens_to_input`).
        grid_size: side of the token grid (16 = 256 px); images are pooled to it.
        feature_dim: width of the penultimate layer returned by :meth:`features`.
        width: channels of the first convolution (then ``2 * width``).
    """

    def __init__(
        self,
        levels: int = DEFAULT_LEVELS,
        grid_size: int = DEFAULT_GRID_SIZE,
        feature_dim: int = 64,
        width: int = 16,
    ) -> None:
        super().__init__()
        if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 4 or grid_size % 4:
            raise ValueError(f"grid_size must be a positive multiple of 4, got {grid_size!r}")
        for name, value in (("feature_dim", feature_dim), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.levels = levels
        self.grid_size = grid_size
        self.feature_dim = feature_dim
        self.num_classes = NUM_CLASSES
        self._tokens_to_grey = PaletteTokenizer(levels, patch=1)
        self.conv1 = nn.Conv2d(1, width, 3, stride=2, padding=1)  # G -> G/2
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)  # G/2 -> G/4
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)  # G/4
        self.fc = nn.Linear(2 * width * (grid_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    # -- inputs -------------------------------------------------------------------------------
    def tokens_to_input(self, tokens: Tensor) -> Tensor:
        """Token grids ``[B, h, w]`` or raster ``[B, N]`` -> network input ``[B, 1, G, G]`` in
        ``[0, 1]``, equal to :meth:`images_to_input` of the decoded uint8 images."""
        grey = self._tokens_to_grey.decode(tokens)[:, :1]  # [B, 1, h, w] in [-1, 1]
        if grey.shape[-1] != self.grid_size or grey.shape[-2] != self.grid_size:
            raise ValueError(
                f"expected {self.grid_size}x{self.grid_size} token grids, got "
                f"{grey.shape[-2]}x{grey.shape[-1]}"
            )
        return images_to_uint8(grey).float().div_(255.0)

    def images_to_input(self, images: Tensor) -> Tensor:
        """uint8 images ``[B, 3, H, W]`` (``H``, ``W`` multiples of the grid side) -> network input
        ``[B, 1, G, G]``: the mean over channels and over each cell, scaled to ``[0, 1]``."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                "images must be a torch.uint8 tensor [B, 3, H, W] "
                "(convert floats in [-1, 1] with lpd.demo.palette.images_to_uint8)"
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        g = self.grid_size
        if height % g or width % g or height == 0 or width == 0:
            raise ValueError(f"image height and width must be positive multiples of {g}, got {height}x{width}")
        device = self.head.weight.device
        chunks = []
        for start in range(0, len(images), 64):  # bounds the float copy of large images
            x = images[start : start + 64].to(device).float().mean(dim=1, keepdim=True)
            chunks.append(F.avg_pool2d(x, (height // g, width // g)))
        if not chunks:
            return torch.empty((0, 1, g, g), device=device)
        return torch.cat(chunks).div_(255.0)

    # -- network ------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Network input ``[B, 1, G, G]`` -> ``(features [B, feature_dim], logits [B, 10])``.

        The features are the penultimate layer before its ReLU, so their covariance has full
        rank (post-ReLU, about a quarter of the units are never active on digits, which makes
        the Fréchet distance's matrix square root singular)."""
        x = x.to(self.head.weight.device) * 2.0 - 1.0
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        features = self.fc(x.flatten(1))  # before the ReLU: no dead (all-zero) dimensions
        return features, self.head(F.relu(features))

    def forward(self, x: Tensor) -> Tensor:
        """Network input ``[B, 1, G, G]`` in ``[0, 1]`` -> logits ``[B, 10]``."""
        return self.embed(x)[1]

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Feature extractor for metrics: uint8 images ``[B, 3, H, W]`` ->
        ``(penultimate features [B, feature_dim], logits [B, 10])``, float32 on the model's
        device. Unaffected by train/eval mode (the network has no dropout or normalisation)."""
        return self.embed(self.images_to_input(images))

    @torch.no_grad()
    def predict_tokens(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, 10]`` for token grids ``[B, h, w]`` or raster tokens ``[B, N]``."""
        return self(self.tokens_to_input(tokens))


def _shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each grid by -1, 0 or +1 cells per axis (zero fill), drawn from ``generator``."""
    padded = F.pad(x, (1, 1, 1, 1))  # [B, C, G + 2, G + 2]
    batch, size = len(x), x.shape[-1]
    offsets = torch.randint(0, 3, (batch, 2), generator=generator)
    rows = offsets[:, :1] + torch.arange(size)  # [B, G]
    cols = offsets[:, 1:] + torch.arange(size)
    b = torch.arange(batch)[:, None, None]
    # [B, G, G, C] -> [B, C, G, G]
    return padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def train_classifier(
    seed: int = 0,
    epochs: int = 10,
    device: torch.device | str = "cpu",
    *,
    levels: int = DEFAULT_LEVELS,
    grid_size: int = DEFAULT_GRID_SIZE,
    tokens: Tensor | None = None,
    labels: Tensor | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    augment: bool = True,
    feature_dim: int = 64,
    num_threads: int | None = 1,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on digit token grids and return it in eval mode.

    Args:
        seed: seeds the initialisation (inside a forked RNG, so the caller's global random
            state is untouched) and a ``torch.Generator`` for shuffling and augmentation.
        epochs: passes over the data (10: about 2 s on one CPU thread, ~0.98 held out).
        device: where to train; the model stays there.
        levels, grid_size: the palette and grid of the data.
        tokens, labels: training data ``[M, G, G]`` (or ``[M, N]``) and ``[M]``; by default the
            ``"train"`` split of :func:`lpd.demo.digits.load_digits_dataset`.
        batch_size, lr: AdamW mini-batch size and learning rate (cosine-decayed to 0).
        augment: randomly shift each training grid by up to one cell per axis.
        feature_dim: width of the feature layer.
        num_threads: torch intra-op CPU threads while training, restored afterwards (``None``
            leaves the setting alone). One thread is fastest for this tiny network, and by far
            the fastest on a shared CPU (10 epochs: about 2 s on 1 thread, up to 30 s on 2
            oversubscribed threads).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (tokens is None) != (labels is None):
        raise ValueError("pass both tokens and labels, or neither")
    if tokens is None:
        tokens, labels = load_digits_dataset("train", grid_size, levels)
    assert labels is not None
    if len(tokens) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many labels as token grids (> 0), got {len(tokens)} and {len(labels)}")
    if num_threads is not None and (
        isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
    ):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    device = torch.device(device)

    previous_threads = torch.get_num_threads()
    if num_threads is not None and device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        return _fit(
            seed, epochs, device, levels, grid_size, tokens, labels, batch_size, lr, augment, feature_dim
        )
    finally:
        if torch.get_num_threads() != previous_threads:
            torch.set_num_threads(previous_threads)


def _fit(
    seed: int,
    epochs: int,
    device: torch.device,
    levels: int,
    grid_size: int,
    tokens: Tensor,
    labels: Tensor,
    batch_size: int,
    lr: float,
    augment: bool,
    feature_dim: int,
) -> DigitClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(levels, grid_size, feature_dim=feature_dim)
    model.to(device).train()
    generator = torch.Generator().manual_seed(seed)

    inputs = model.tokens_to_input(tokens).cpu()  # [M, 1, G, G]
    targets = labels.long().cpu()
    if targets.min() < 0 or targets.max() >= NUM_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES})")
    steps_per_epoch = math.ceil(len(inputs) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x = inputs[idx]
            if augment:
                x = _shift(x, generator)
            loss = F.cross_entropy(model(x.to(device)), targets[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, tokens: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Fraction of token grids (``[M, G, G]`` or raster ``[M, N]``) classified as ``labels``."""
    if len(tokens) != len(labels) or len(labels) == 0:
        raise ValueError(f"need as many labels as token grids (> 0), got {len(tokens)} and {len(labels)}")
    correct = 0
    for start in range(0, len(tokens), batch_size):
        logits = model.predict_tokens(tokens[start : start + batch_size])
        correct += (logits.argmax(-1).cpu() == labels[start : start + batch_size].cpu()).sum().item()
    return correct / len(labels)
