"""The demo's judge: a small CNN digit classifier and :class:`Judge` (accuracy and Fréchet distance to the held-out
digits, with 95% bootstrap intervals). Images are pooled to the token grid, so a decoded palette image and its
tokens are the same input."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lpd.demo.digits import GRID_SIZE, NUM_CLASSES, load_digits_dataset
from lpd.tokenizer.palette import DEFAULT_LEVELS, images_to_uint8


class DigitClassifier(nn.Module):
    """Three 3x3 convolutions (two of stride 2) and two linear layers over a ``grid_size``-square grid."""

    def __init__(
        self,
        levels: int = DEFAULT_LEVELS,
        grid_size: int = GRID_SIZE,
        feature_dim: int = 64,
        width: int = 16,
    ) -> None:
        super().__init__()
        self.grid_size, self.feature_dim = grid_size, feature_dim
        # the grey of each token as the decoded uint8 image has it, in [0, 1]
        grey = images_to_uint8(torch.linspace(-1.0, 1.0, levels)).float() / 255
        self.register_buffer("grey", grey, persistent=False)
        self.conv1 = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (grid_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def tokens_to_input(self, tokens: Tensor) -> Tensor:
        """Token grids ``[B, G, G]`` or raster ``[B, G*G]`` -> network input ``[B, 1, G, G]`` in ``[0, 1]``."""
        g = self.grid_size
        return self.grey[tokens.to(self.grey.device).reshape(len(tokens), 1, g, g)]

    def images_to_input(self, images: Tensor) -> Tensor:
        """uint8 images ``[B, 3, H, W]`` -> network input ``[B, 1, G, G]``: each cell's mean over pixels and channels."""
        if not isinstance(images, Tensor) or images.dtype != torch.uint8:
            raise TypeError("images must be a torch.uint8 tensor [B, 3, H, W]")
        (h, w), g = images.shape[-2:], self.grid_size
        if images.dim() != 4 or images.shape[1] != 3 or not h or h % g or not w or w % g:
            raise ValueError(
                f"images must be [B, 3, H, W] with H, W multiples of {g}, got {tuple(images.shape)}"
            )
        if not len(images):
            return images.new_empty((0, 1, g, g), dtype=torch.float32)
        grey = lambda x: x.to(self.grey.device).float().mean(1, keepdim=True)  # noqa: E731
        # 64 at a time: bounds the float copy
        return torch.cat([F.avg_pool2d(grey(x), (h // g, w // g)) for x in images.split(64)]) / 255

    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Network input -> ``(features [B, feature_dim], logits [B, 10])``; features before the ReLU (full-rank)."""
        x = F.relu(self.conv3(F.relu(self.conv2(F.relu(self.conv1(x * 2.0 - 1.0))))))
        features = self.fc(x.flatten(1))
        return features, self.head(F.relu(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(x)[1]

    @torch.no_grad()
    def features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The metric extractor: uint8 images ``[B, 3, H, W]`` -> ``(features, logits)``."""
        return self.embed(self.images_to_input(images))

    @torch.no_grad()
    def predict_tokens(self, tokens: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of token grids."""
        return self(self.tokens_to_input(tokens))


def _shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Translate each grid ``[B, 1, G, G]`` by -1, 0 or +1 cells per axis (zero fill)."""
    size = x.shape[-1]
    offsets = torch.randint(0, 3, (len(x), 2), generator=generator)
    rows = (offsets[:, :1] + torch.arange(size))[:, :, None]
    cols = (offsets[:, 1:] + torch.arange(size))[:, None, :]
    return F.pad(x, (1, 1, 1, 1))[torch.arange(len(x))[:, None, None], 0, rows, cols].unsqueeze(1)


def train_classifier(
    seed: int = 0,
    epochs: int = 10,
    device: torch.device | str = "cpu",
    *,
    levels: int = DEFAULT_LEVELS,
    tokens: Tensor | None = None,
    labels: Tensor | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    num_threads: int | None = 1,
) -> DigitClassifier:
    """A :class:`DigitClassifier` fitted (AdamW, cosine decay, random one-cell shifts; deterministic for a seed, global
    random state untouched) on ``tokens``/``labels`` (default: the training digits) with ``num_threads`` (None: as set)."""
    if tokens is None or labels is None:
        tokens, labels = load_digits_dataset("train", levels=levels)
    device, threads = torch.device(device), torch.get_num_threads()
    if num_threads and device.type == "cpu":
        torch.set_num_threads(num_threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            side = tokens.shape[-1] if tokens.dim() == 3 else math.isqrt(tokens.shape[-1])
            model = DigitClassifier(levels, side)
        model.to(device).train()
        generator = torch.Generator().manual_seed(seed)
        inputs, targets = model.tokens_to_input(tokens).cpu(), labels.long().cpu()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        total = epochs * math.ceil(len(inputs) / batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
        for _ in range(epochs):
            for idx in torch.randperm(len(inputs), generator=generator).split(batch_size):
                logits = model(_shift(inputs[idx], generator).to(device))
                loss = F.cross_entropy(logits, targets[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def accuracy(model: DigitClassifier, tokens: Tensor, labels: Tensor) -> float:
    """Fraction of token grids classified as ``labels``."""
    return float((model.predict_tokens(tokens).argmax(-1).cpu() == labels.cpu()).float().mean())


def bootstrap(
    statistic: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """``statistic(indices)`` of ``resamples`` draws of ``n`` of ``range(n)`` with replacement (seeded)."""
    rng = np.random.default_rng(seed)
    return np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    resamples: int = 1000,
    seed: int = 0,
    *,
    basic: bool = False,
) -> list[float]:
    """95% interval: the percentiles 2.5 and 97.5 of :func:`bootstrap`, or with ``basic`` ``2 * statistic(all) -
    percentiles``, for a statistic that resampling biases (the Fréchet distance)."""
    lo, hi = np.percentile(bootstrap(statistic, n, resamples, seed), [2.5, 97.5])
    if basic:
        full = statistic(np.arange(n))
        lo, hi = 2 * full - hi, 2 * full - lo
    return [float(lo), float(hi)]


def frechet_to(mu: np.ndarray, sigma: np.ndarray) -> Callable[[np.ndarray], float]:
    """Features ``[n, F]`` -> Fréchet distance to ``(mu, sigma)``: :func:`lpd.metrics.frechet_distance`, ten times faster
    (a symmetric eigenproblem; the root of the fixed ``sigma`` computed once)."""
    w, v = np.linalg.eigh(sigma)
    root, trace = (v * np.sqrt(w.clip(0))) @ v.T, np.trace(sigma)

    def distance(features: np.ndarray) -> float:
        m, s = features.mean(0), np.cov(features, rowvar=False)
        cross = np.sqrt(np.linalg.eigvalsh(root @ s @ root).clip(0)).sum()
        return float(((m - mu) ** 2).sum() + np.trace(s) + trace - 2.0 * cross)

    return distance


@dataclass
class Judge:
    """Scores generated digits with ``classifier`` against ``reference`` (the held-out digits' feature mean, covariance)."""

    classifier: DigitClassifier
    reference: tuple[np.ndarray, np.ndarray]
    resamples: int = 1000
    seed: int = 0

    @classmethod
    def held_out(
        cls, classifier: DigitClassifier, levels: int = DEFAULT_LEVELS, **kwargs: Any
    ) -> Judge:
        """A judge whose reference is the held-out digits (their token grids: identical network inputs)."""
        tokens, _ = load_digits_dataset("test", classifier.grid_size, levels)
        with torch.no_grad():
            f = classifier.embed(classifier.tokens_to_input(tokens))[0].cpu().double().numpy()
        return cls(classifier, (f.mean(0), np.cov(f, rowvar=False)), **kwargs)

    def score(
        self, images: np.ndarray | Tensor, labels: np.ndarray | Sequence[int]
    ) -> dict[str, Any]:
        """uint8 images ``[n, H, W, 3]`` meant to show digits ``labels`` -> ``{"num_images", "accuracy",
        "accuracy_ci95", "frechet" (plug-in), "frechet_debiased", "frechet_ci95"}`` (intervals ``[low, high]``)."""
        images = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2)
        feats, logits = self.classifier.features(images)
        correct = logits.argmax(-1).cpu().numpy() == np.asarray(labels)
        f, frechet = feats.cpu().double().numpy(), frechet_to(*self.reference)
        ci = dict(n=len(f), resamples=self.resamples, seed=self.seed)
        plug, draws = frechet(f), bootstrap(lambda i: frechet(f[i]), **ci)
        low, high = np.percentile(draws, [2.5, 97.5])
        # basic bootstrap around the debiased estimate 2 f - mean(f*), which it always contains; never negative
        return {
            "num_images": len(f),
            "accuracy": float(correct.mean()),
            "accuracy_ci95": bootstrap_ci(lambda i: correct[i].mean(), **ci),
            "frechet": plug,
            "frechet_debiased": max(0.0, 2 * plug - float(draws.mean())),
            "frechet_ci95": [max(0.0, 2 * plug - high), max(0.0, 2 * plug - low)],
        }
