"""The compositional text-to-image testbed (GenEval in miniature): scenes of the embedded digits on
the demo's 16 x 16 palette token grid (256 px), each with a caption generated from its attributes.

* single digits, full size: the digit (numeral "7" or word "seven") and optionally its stroke
  ("thin", "bold": the upsampled digit eroded / dilated with a 3 x 3 cross);
* small digits: the digit at its native 8 x 8 size in a quadrant ("a small 7 in the top left"),
  optionally thin or bold;
* two-digit scenes: two small digits side by side ("a 3 to the left of a 5", "a 5 to the right
  of a 3") or stacked ("a 3 above a 5", "a 5 below a 3").

The split (:func:`heldout_combinations`, seeded): the last phrasing of every template list is held
out; so are a seeded quarter of the (digit, stroke) pairs of full-size digits, a quarter of the
(digit, quadrant) pairs of small digits and a quarter of the ordered two-digit pairs of each
layout. Training examples (:func:`make_examples` group ``train``) use neither; the evaluation
groups are ``seen`` (training phrasings and combinations), ``heldout_phrasing`` and
``heldout_combination``. Scenes of the ``train`` group draw their digit images from the demo's
training digits, the others from the held-out digits.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lpd.demo.digits import GRID_SIZE, load_raw_digits, split_indices
from lpd.tokenizer.palette import DEFAULT_LEVELS, PaletteTokenizer

__all__ = [
    "Scene",
    "Example",
    "QUADRANTS",
    "STROKES",
    "LAYOUTS",
    "TEMPLATES",
    "GROUPS",
    "render",
    "digit_grey",
    "grey_to_tokens",
    "region_tokens",
    "heldout_combinations",
    "make_examples",
    "caption",
]

HALF = GRID_SIZE // 2
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STROKES = ("thin", "bold")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
LAYOUTS = ("side by side", "stacked")  # the first digit on the left / on top
GROUPS = ("train", "seen", "heldout_phrasing", "heldout_combination")

#: Phrasings by scene type; the last of each list is held out of training. {d} digit, {s} stroke,
#: {p} quadrant, {a} / {b} the first (left or top) / second digit.
TEMPLATES = {
    "full": (
        "a {d}",
        "the digit {d}",
        "a large {d}",
        "a picture of a {d}",
        "a big handwritten {d}",
    ),
    "full_stroke": (
        "a {s} {d}",
        "the digit {d} in {s} strokes",
        "a large {s} {d}",
        "a {d} drawn with {s} lines",
    ),
    "small": (
        "a small {d} in the {p}",
        "in the {p}, a small {d}",
        "a tiny {d} in the {p} corner",
        "a little {d} placed at the {p}",
    ),
    "small_stroke": (
        "a small {s} {d} in the {p}",
        "in the {p}, a small {s} {d}",
        "a tiny {s} {d} at the {p}",
    ),
    "side by side": (
        "a {a} to the left of a {b}",
        "a {b} to the right of a {a}",
        "{a} on the left and {b} on the right",
        "a {a} next to a {b}, the {a} on the left",
    ),
    "stacked": (
        "a {a} above a {b}",
        "a {b} below a {a}",
        "{a} on top and {b} at the bottom",
        "a {a} placed over a {b}",
    ),
}


@dataclass(frozen=True)
class Scene:
    """One or two digits (``sources``: indices of their images in the embedded data) and their
    attributes: ``stroke`` (None: regular), ``place`` (a quadrant: a small digit there; None: full
    size) and, for two digits, ``layout`` (the first digit left or on top)."""

    digits: tuple[int, ...]
    sources: tuple[int, ...]
    stroke: str | None = None
    place: str | None = None
    layout: str | None = None

    @property
    def kind(self) -> str:
        return "pair" if len(self.digits) == 2 else ("small" if self.place else "full")


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str
    template: str  # "<template list>/<index>"
    group: str


def _cross(x: Tensor, reduce: str) -> Tensor:
    """Grey erosion (``min``) or dilation (``max``) of ``[B, 1, H, W]`` with a 3 x 3 cross, black
    outside."""
    p = F.pad(x, (1, 1, 1, 1))
    shifts = torch.stack(
        [
            p[..., 1:-1, 1:-1],
            p[..., :-2, 1:-1],
            p[..., 2:, 1:-1],
            p[..., 1:-1, :-2],
            p[..., 1:-1, 2:],
        ]
    )
    return shifts.amin(0) if reduce == "min" else shifts.amax(0)


def digit_grey(
    sources: Sequence[int] | np.ndarray, stroke: str | None = None, small: bool = False
) -> Tensor:
    """Digits as greys in [0, 1]: ``[B, 1, 16, 16]`` (bicubic from 8 x 8), thin / bold by a cross
    erosion / dilation, ``small``: averaged back to ``[B, 1, 8, 8]``."""
    images, _ = load_raw_digits()
    x = (
        torch.from_numpy(images[np.asarray(sources, dtype=np.int64)])
        .float()
        .div_(16.0)
        .unsqueeze(1)
    )
    x = F.interpolate(x, size=(GRID_SIZE, GRID_SIZE), mode="bicubic").clamp_(0.0, 1.0)
    if stroke is not None:
        x = _cross(x, {"thin": "min", "bold": "max"}[stroke])
    return F.avg_pool2d(x, 2) if small else x


@lru_cache(maxsize=1)
def _palette() -> PaletteTokenizer:
    return PaletteTokenizer(DEFAULT_LEVELS, patch=1)


def grey_to_tokens(grey: Tensor) -> Tensor:
    """Greys ``[B, 1, H, W]`` in [0, 1] -> palette tokens ``[B, H, W]``."""
    return _palette().encode(grey.mul(2.0).sub(1.0).expand(-1, 3, -1, -1))


def region_tokens(tokens: Tensor) -> Tensor:
    """Token regions ``[B, 8, 8]`` -> full-size ``[B, 16, 16]`` tokens (bicubic): what the judge
    classifies."""
    grey = tokens.float().div(DEFAULT_LEVELS - 1).unsqueeze(1)
    return grey_to_tokens(
        F.interpolate(grey, size=(GRID_SIZE, GRID_SIZE), mode="bicubic").clamp_(0.0, 1.0)
    )


def _corner(place: str) -> tuple[int, int]:
    return (0 if place.startswith("top") else HALF, 0 if place.endswith("left") else HALF)


def render(scenes: Sequence[Scene]) -> Tensor:
    """Token grids ``[B, 16, 16]`` (int64, palette levels) of ``scenes``."""
    canvas = torch.zeros((len(scenes), 1, GRID_SIZE, GRID_SIZE))
    q = HALF // 2
    for i, s in enumerate(scenes):
        if s.kind == "full":
            canvas[i] = digit_grey(s.sources, s.stroke)[0]
            continue
        small = digit_grey(s.sources, s.stroke, small=True)
        corners = (
            [_corner(s.place)]
            if s.kind == "small"
            else [(q, 0), (q, HALF)]
            if s.layout == "side by side"
            else [(0, q), (HALF, q)]
        )
        for (r, c), img in zip(corners, small):
            canvas[i, :, r : r + HALF, c : c + HALF] = img
    return grey_to_tokens(canvas)


def heldout_combinations(seed: int = 0) -> dict[str, set[tuple]]:
    """The attribute combinations held out of training: a seeded quarter of each kind's
    combinations."""
    rng = np.random.default_rng(seed)

    def quarter(items: list[tuple]) -> set[tuple]:
        return {items[i] for i in rng.permutation(len(items))[: len(items) // 4]}

    pairs = [(a, b) for a, b in itertools.permutations(range(10), 2)]
    return {
        "full_stroke": quarter([(d, s) for d in range(10) for s in STROKES]),
        "small": quarter([(d, p) for d in range(10) for p in QUADRANTS]),
        **{layout: quarter(pairs) for layout in LAYOUTS},
    }


def caption(scene: Scene, template: str, words: Sequence[bool]) -> str:
    """The caption of ``scene`` by ``template``; ``words[k]``: digit ``k`` as a word, else as a
    numeral."""
    d = [WORDS[v] if w else str(v) for v, w in zip(scene.digits, words)]
    text = template.format(d=d[0], a=d[0], b=d[-1], s=scene.stroke or "", p=scene.place or "")
    return re.sub(r"\b([Aa]) (8|eight)\b", r"\1n \2", text)


def _combination(scene: Scene) -> tuple[str, tuple] | None:
    if scene.kind == "pair":
        return scene.layout, scene.digits
    if scene.kind == "small":
        return "small", (scene.digits[0], scene.place)
    return ("full_stroke", (scene.digits[0], scene.stroke)) if scene.stroke else None


def make_examples(
    n: int,
    group: str = "train",
    seed: int = 0,
    split_seed: int = 0,
    pairs: float = 1 / 3,
    small: float | None = None,
) -> list[Example]:
    """``n`` captioned scenes of ``group`` (:data:`GROUPS`), a function of its arguments: two
    digits with probability ``pairs``, else one digit 2:1:1 (full, full with a stroke, small), a
    small digit thin or bold one time in three, numerals and words even; ``split_seed`` picks the
    held-out combinations; ``small``: the share of small digits among one-digit scenes instead
    (the rest full 2:1 plain or with a stroke)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    held = heldout_combinations(split_seed)
    rng = np.random.default_rng([seed, GROUPS.index(group)])
    _, labels = load_raw_digits()
    pool = split_indices("train" if group == "train" else "test")
    by_digit = [pool[labels[pool] == d] for d in range(10)]
    out: list[Example] = []
    while len(out) < n:
        if rng.random() < pairs:
            kind = "pair"
        elif small is None:
            kind = ("full", "full_stroke", "small", "full")[rng.integers(4)]
        else:
            kind = (
                "small"
                if rng.random() < small
                else ("full", "full_stroke", "full")[rng.integers(3)]
            )
        digits = tuple(
            int(v)
            for v in (
                rng.choice(10, 2, replace=False) if kind == "pair" else rng.integers(10, size=1)
            )
        )
        stroke = (
            STROKES[rng.integers(2)]
            if kind == "full_stroke" or (kind == "small" and rng.integers(3) == 0)
            else None
        )
        scene = Scene(
            digits,
            tuple(int(rng.choice(by_digit[d])) for d in digits),
            stroke,
            QUADRANTS[rng.integers(4)] if kind == "small" else None,
            LAYOUTS[rng.integers(2)] if kind == "pair" else None,
        )
        combo = _combination(scene)
        held_combo = combo is not None and combo[1] in held[combo[0]]
        if held_combo != (group == "heldout_combination") or (
            combo is None and group == "heldout_combination"
        ):
            continue
        name = scene.layout if kind == "pair" else kind if not stroke else f"{scene.kind}_stroke"
        templates = TEMPLATES[name]
        k = (
            len(templates) - 1
            if group == "heldout_phrasing"
            else int(rng.integers(len(templates) - 1))
        )
        words = tuple(bool(w) for w in rng.integers(2, size=len(digits)))
        out.append(Example(scene, caption(scene, templates[k], words), f"{name}/{k}", group))
    return out
