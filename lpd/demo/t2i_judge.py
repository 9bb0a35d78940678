"""The testbed's judge: scores each attribute a scene's caption states, on generated 16 x 16 token
grids.

* ``digit``: the digit classifier (``lpd.demo.classifier``, trained here on full-size digits and on
  upsampled 8 x 8 regions, regular / thin / bold) on the whole grid for a full-size digit, on the
  8 x 8 window of most ink for a small one;
* ``size``: the ink's bounding box: at least 12 cells high for a full-size digit, at most 10 for a
  small one;
* ``position``: the quadrant of the ink's centre of mass (small digits);
* ``stroke``: the ink mass of the digit against the thin / regular / bold ranges of real scenes (the
  midpoints between their means, by size);
* two digits: ``digits`` (the two halves along the layout's axis hold the two digits, in any
  order) and ``relation`` (in the stated order).

Accuracies come with 95% bootstrap intervals (``lpd.demo.classifier.bootstrap_ci``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lpd.demo.classifier import DigitClassifier, bootstrap_ci, train_classifier
from lpd.demo.digits import GRID_SIZE, load_raw_digits, split_indices
from lpd.demo.t2i_data import HALF, QUADRANTS, Scene, digit_grey, grey_to_tokens, region_tokens
from lpd.tokenizer.palette import DEFAULT_LEVELS

__all__ = ["T2IJudge", "ink_mass", "ATTRIBUTES"]

#: ``digit``: every one-digit prompt; ``full digit`` / ``small digit``: the same verdicts by size
ATTRIBUTES = (
    "digit",
    "full digit",
    "small digit",
    "size",
    "position",
    "stroke",
    "digits",
    "relation",
)
FULL_MIN_HEIGHT, SMALL_MAX_HEIGHT = 12, 10


def ink_mass(tokens: Tensor) -> Tensor:
    """Ink of token grids ``[B, h, w]``: the sum of their grey levels in units of full ink."""
    return tokens.float().sum((-2, -1)) / (DEFAULT_LEVELS - 1)


def _ink_window(tokens: Tensor, anchors: tuple[Sequence[int], Sequence[int]]) -> Tensor:
    """The 8 x 8 window of most ink of each grid ``[B, H, W]`` (``[B, 8, 8]``); ties go to the
    window nearest to an anchor (row corners, column corners) where the testbed places digits."""
    sums = F.avg_pool2d(tokens.float().unsqueeze(1), HALF, stride=1)[:, 0]  # [B, H - 7, W - 7]
    near = [
        torch.stack([(torch.arange(n) - a).abs() for a in anchor]).amin(0)
        for n, anchor in zip(sums.shape[1:], anchors)
    ]
    penalty = (near[0][:, None] + near[1][None, :]).float()
    best = (
        torch.where(sums >= sums.amax((1, 2), keepdim=True) - 1e-6, -penalty, -np.inf)
        .flatten(1)
        .argmax(1)
    )
    r, c = best // sums.shape[-1], best % sums.shape[-1]
    rows = (r[:, None] + torch.arange(HALF))[:, :, None]
    cols = (c[:, None] + torch.arange(HALF))[:, None, :]
    return tokens[torch.arange(len(tokens))[:, None, None], rows, cols]


def _halves(tokens: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """The two 8-cell halves along the layout's axis, each reduced to its 8 x 8 window of most
    ink."""
    q = HALF // 2
    if layout == "stacked":
        return _ink_window(tokens[:, :HALF], ([0], [q])), _ink_window(tokens[:, HALF:], ([0], [q]))
    return _ink_window(tokens[:, :, :HALF], ([q], [0])), _ink_window(
        tokens[:, :, HALF:], ([q], [0])
    )


def _height(tokens: Tensor) -> Tensor:
    """Rows spanned by ink (any token above black) in each grid ``[B, H, W]``."""
    rows = (tokens > 0).any(-1)
    idx = torch.arange(tokens.shape[1])
    first = torch.where(rows, idx, tokens.shape[1]).amin(1)
    last = torch.where(rows, idx, -1).amax(1)
    return (last - first + 1).clamp_(min=0)


def _quadrant(tokens: Tensor) -> list[str]:
    """The quadrant of each grid's ink centre of mass."""
    w = tokens.float()
    total = w.sum((1, 2)).clamp_(min=1e-6)
    coord = torch.arange(GRID_SIZE, dtype=torch.float32) + 0.5
    r, c = (w.sum(2) * coord).sum(1) / total, (w.sum(1) * coord).sum(1) / total
    return [QUADRANTS[2 * int(a >= HALF) + int(b >= HALF)] for a, b in zip(r.tolist(), c.tolist())]


@dataclass
class T2IJudge:
    """``classifier`` and the stroke thresholds ``{"full" | "small": (thin | regular, regular |
    bold)}``."""

    classifier: DigitClassifier
    stroke_bounds: dict[str, tuple[float, float]]
    resamples: int = 1000
    seed: int = 0

    @classmethod
    def fit(cls, seed: int = 0, epochs: int = 10, **kwargs: Any) -> T2IJudge:
        """Train the classifier on the training digits (full size and 8 x 8 regions; every stroke)
        and set the stroke ranges from their scenes."""
        idx = split_indices("train")
        labels = torch.from_numpy(load_raw_digits()[1][idx].copy())
        tokens, bounds = [], {}
        for small in (False, True):
            means = []
            for stroke in ("thin", None, "bold"):
                t = grey_to_tokens(digit_grey(idx, stroke, small))
                means.append(float(ink_mass(t).mean()))
                tokens.append(region_tokens(t) if small else t)
            bounds["small" if small else "full"] = (
                (means[0] + means[1]) / 2,
                (means[1] + means[2]) / 2,
            )
        clf = train_classifier(
            seed, epochs, tokens=torch.cat(tokens), labels=labels.repeat(len(tokens))
        )
        return cls(clf, bounds, **kwargs)

    def _predict(self, tokens: Tensor) -> list[int]:
        return (
            self.classifier.predict_tokens(tokens).argmax(-1).cpu().tolist() if len(tokens) else []
        )

    def judge(self, tokens: Tensor, scenes: Sequence[Scene]) -> list[dict[str, bool]]:
        """Per grid ``[B, 16, 16]``, ``{attribute: correct}`` for the attributes its scene's
        caption states."""
        tokens = torch.as_tensor(tokens).long().reshape(len(scenes), GRID_SIZE, GRID_SIZE).cpu()
        out: list[dict[str, bool]] = [{} for _ in scenes]
        window = _ink_window(tokens, ([0, HALF], [0, HALF]))
        full_pred = self._predict(tokens)
        small_pred = self._predict(region_tokens(window))
        height, mass, quadrant = (
            _height(tokens).tolist(),
            ink_mass(tokens).tolist(),
            _quadrant(tokens),
        )
        for i, s in enumerate(scenes):
            if s.kind == "pair":
                continue
            small = s.kind == "small"
            out[i]["digit"] = (small_pred if small else full_pred)[i] == s.digits[0]
            out[i][f"{'small' if small else 'full'} digit"] = out[i]["digit"]
            out[i]["size"] = (
                height[i] <= SMALL_MAX_HEIGHT if small else height[i] >= FULL_MIN_HEIGHT
            )
            if small:
                out[i]["position"] = quadrant[i] == s.place
            if s.stroke:
                lo, hi = self.stroke_bounds["small" if small else "full"]
                out[i]["stroke"] = mass[i] < lo if s.stroke == "thin" else mass[i] > hi
        for layout in ("side by side", "stacked"):
            idx = [i for i, s in enumerate(scenes) if s.kind == "pair" and s.layout == layout]
            if not idx:
                continue
            first, second = (self._predict(region_tokens(h)) for h in _halves(tokens[idx], layout))
            for i, a, b in zip(idx, first, second):
                want = scenes[i].digits
                out[i]["digits"] = sorted((a, b)) == sorted(want)
                out[i]["relation"] = (a, b) == want
        return out

    def score(self, tokens: Tensor, scenes: Sequence[Scene]) -> dict[str, Any]:
        """``{"num_images", attribute: {"n", "accuracy", "ci95"}}`` for every attribute some scene
        states."""
        verdicts = self.judge(tokens, scenes)
        result: dict[str, Any] = {"num_images": len(scenes)}
        for attr in ATTRIBUTES:
            hits = np.array([v[attr] for v in verdicts if attr in v], dtype=np.float64)
            if hits.size:
                result[attr] = {
                    "n": int(hits.size),
                    "accuracy": float(hits.mean()),
                    "ci95": bootstrap_ci(
                        lambda i: hits[i].mean(), hits.size, self.resamples, self.seed
                    ),
                }
        return result
