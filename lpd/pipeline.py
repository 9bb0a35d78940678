"""Images from class labels in one call: a released model, its tokenizer, orders and schedule together.

    from lpd.pipeline import LPDPipeline

    pipe = LPDPipeline.from_pretrained("lpd_l", 256)   # checkpoint + VQ from the Hub cache; CUDA when available
    images = pipe([207, 360, 387, 974], steps=20)                     # uint8 [4, 256, 256, 3]
    pipe.save_grid(images, "samples.png")

or from the command line::

    python -m lpd.pipeline --model lpd_l --img_size 256 --labels 207,360,387,974 --steps 20 --output samples.png

Defaults are the paper's settings for the model, resolution and step count (:data:`PAPER_SETTINGS`:
repulsion threshold and linear CFG scale), locality-aware orders and the released group-size
table. Image ``k`` of a call is image ``start_index + k`` of a ``main_eval.py`` run with the same
seed and settings (same order, same random stream, same tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
import torch

from lpd.checkpoint import CheckpointError
from lpd.evaluate import sample_batch
from lpd.images import save_grid
from lpd.orders.source import OrderSource
from lpd.sampling import SamplingConfig
from lpd.schedules import group_sizes as default_group_sizes
from lpd.schedules import parse_group_sizes

__all__ = ["LPDPipeline", "PAPER_SETTINGS", "paper_settings", "main"]

#: (model, img_size, steps) -> (repulsion threshold τr, linear cfg scale) of the released evaluation scripts.
PAPER_SETTINGS: dict[tuple[str, int, int], tuple[float, float]] = {
    ("lpd_l", 256, 20): (2.0, 4.8),
    ("lpd_xl", 256, 20): (2.0, 4.9),
    ("lpd_xxl", 256, 20): (3.0, 5.9),
    ("lpd_l", 256, 32): (2.0, 5.4),
    ("lpd_xl", 256, 32): (2.0, 5.0),
    ("lpd_l", 512, 48): (4.0, 7.3),
    ("lpd_xl", 512, 48): (4.0, 6.0),
}


def paper_settings(model: str | None, img_size: int, steps: int) -> tuple[float, float] | None:
    """``(τr, cfg)`` of the paper for this model, resolution and step count, or ``None``."""
    return PAPER_SETTINGS.get((str(model), int(img_size), int(steps)))


class LPDPipeline:
    """An LPD model and its tokenizer, sampled with orders and schedules made for each call.

    ``model``: an LPD (any device; evaluation mode is set); ``tokenizer``: anything with
    ``decode(tokens [B, h, w]) -> images [B, 3, H, W] in [-1, 1]``; ``name``: the preset name
    (``lpd_l`` ...) used to look up :data:`PAPER_SETTINGS`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, name: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def from_pretrained(
        cls,
        model: str = "lpd_l",
        img_size: int = 256,
        *,
        checkpoint: str | os.PathLike | None = None,
        vqgan_path: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> "LPDPipeline":
        """The released ``model`` at ``img_size`` (``checkpoint`` overrides the Hugging Face Hub
        download; so does ``vqgan_path`` for the LlamaGen VQ).  ``device`` defaults to CUDA when
        available.  Offline and not cached: an error naming the file, its repository and the flag."""
        from lpd.models import load_lpd
        from lpd.tokenizer import make_tokenizer

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        net = load_lpd(checkpoint if checkpoint is not None else model, model=model, img_size=img_size)
        return cls(net.to(device), make_tokenizer("vq", vqgan_path, device=device), name=model)

    @property
    def img_size(self) -> int:
        return int(self.model.config.img_size)

    @property
    def grid_size(self) -> int:
        return int(self.model.grid_size)

    def settings(self, steps: int) -> tuple[float, float] | None:
        """The paper's ``(τr, cfg)`` for ``steps`` with this model, if it is a released setting."""
        return paper_settings(self.name, self.img_size, steps)

    @torch.no_grad()
    def __call__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        *,
        steps: int = 20,
        group_sizes: Sequence[int] | str | None = None,
        cfg: float | None = None,
        cfg_schedule: str = "linear",
        order: str = "lpd",
        repulsion_threshold: float | None = None,
        proximity_threshold: float = 1.0,
        orders: np.ndarray | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        start_index: int = 0,
        bf16: bool = False,
    ) -> np.ndarray:
        """uint8 images ``[len(labels), H, W, 3]`` of the given classes.

        ``steps`` picks the released group-size table (``group_sizes`` gives a schedule instead);
        ``cfg`` and ``repulsion_threshold`` default to the paper's values for this model and step
        count (else ``cfg`` must be given, and ``τr`` is 2 on a 16x16 grid, 4 on 32x32); ``order``
        ``lpd`` / ``random`` / ``raster``, or ``orders`` an explicit ``[B, N]`` table.
        """
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if labels.size == 0 or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be one or more integer class indices, got {labels.dtype} {labels.tolist()[:8]}")
        n = self.grid_size ** 2
        if group_sizes is not None:
            sizes = parse_group_sizes(group_sizes, n)
            steps = len(sizes)
        else:
            sizes = default_group_sizes(self.img_size, steps, int(self.model.config.vqgan_stride))
        paper = self.settings(len(sizes))
        if cfg is None:
            if paper is None:
                raise ValueError(f"no released cfg for {self.name or 'this model'} at {self.img_size} px and "
                                 f"{len(sizes)} steps; pass cfg= (e.g. 4.0, or 1.0 for no guidance)")
            cfg = paper[1]
        if repulsion_threshold is None:
            repulsion_threshold = paper[0] if paper is not None else (2.0 if self.grid_size <= 16 else 4.0)
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        indices = np.arange(start_index, start_index + labels.size, dtype=np.int64)
        if orders is not None:
            table = np.asarray(orders, dtype=np.int64)
            if table.ndim != 2 or table.shape[0] != labels.size:
                raise ValueError(f"orders must have one row per label: shape [{labels.size}, {n}], got {list(table.shape)}")
            source = OrderSource("lpd", sizes, self.grid_size, table=table)
            rows = source.rows(np.arange(labels.size))
        else:
            source = OrderSource(order, sizes, self.grid_size, seed=seed, proximity_threshold=proximity_threshold,
                                 repulsion_threshold=repulsion_threshold)
            rows = source.rows(indices)
        sampling = SamplingConfig(cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p,
                                  order=order, proximity_threshold=proximity_threshold,
                                  repulsion_threshold=repulsion_threshold, bf16=bf16)
        images, _, _, _ = sample_batch(self.model, self.tokenizer, indices, labels, rows, sizes, sampling, seed)
        return images

    @staticmethod
    def to_pil(images: np.ndarray) -> list:
        """uint8 ``[B, H, W, 3]`` -> a list of ``PIL.Image``."""
        from PIL import Image

        return [Image.fromarray(np.ascontiguousarray(im), "RGB") for im in images]

    @staticmethod
    def save_grid(images: np.ndarray, path: str | os.PathLike, ncol: int = 8) -> None:
        """Write the images as one PNG grid (atomically)."""
        save_grid(path, list(images), ncol=ncol, max_tile=max(images.shape[1:3]))


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices such as 207,360, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lpd.pipeline", allow_abbrev=False,
                                description="Sample images of given classes with a released LPD model into a PNG grid.")
    p.add_argument("--model", default="lpd_l", help="lpd_l, lpd_xl, lpd_xxl")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--labels", type=_labels, default=[207, 360, 387, 974, 88, 979, 417, 279],
                   help="comma-separated ImageNet class indices")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (the released group-size table)")
    p.add_argument("--group_sizes", default=None, help="an explicit schedule instead of --steps, e.g. '[1, 2, 4]*...'")
    p.add_argument("--cfg", type=float, default=None, help="default: the paper's value for model / size / steps")
    p.add_argument("--cfg_schedule", default="linear", choices=["linear", "constant"])
    p.add_argument("--order", default="lpd", choices=["lpd", "random", "raster"])
    p.add_argument("--repulsion_threshold", type=float, default=None, help="default: the paper's value")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--pretrained_ckpt", default=None, help="checkpoint file instead of the Hub download")
    p.add_argument("--vqgan_path", default=None, help="vq_ds16_c2i.pt instead of the Hub download")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="samples.png", help="PNG grid to write")
    args = p.parse_args(argv)
    try:
        pipe = LPDPipeline.from_pretrained(args.model, args.img_size, checkpoint=args.pretrained_ckpt,
                                           vqgan_path=args.vqgan_path, device=args.device)
        images = pipe(args.labels, steps=args.steps, group_sizes=args.group_sizes, cfg=args.cfg,
                      cfg_schedule=args.cfg_schedule, order=args.order, repulsion_threshold=args.repulsion_threshold,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, bf16=args.bf16)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe.save_grid(images, args.output)
    print(f"wrote {len(images)} images ({args.model}, {pipe.img_size} px, {len(images)} classes) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
