"""Images from class labels, and edits of images, in one call: a released model with its tokenizer.

``LPDPipeline.from_pretrained("lpd_l", 256)([207, 360], steps=20)`` samples at :data:`PAPER_SETTINGS`; image ``k`` is image
``start_index + k`` of a ``main_eval.py`` run of the same seed. ``pipe.inpaint(image, "center", label=207)`` edits.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import numpy as np
import torch

from lpd.checkpoint import CheckpointError
from lpd.evaluate import sample_batch
from lpd.images import save_grid
from lpd.orders.source import OrderSource
from lpd.sampling import SamplingConfig, add_sampling_args
from lpd.schedules import group_sizes as default_group_sizes, parse_group_sizes

__all__ = ["LPDPipeline", "PAPER_SETTINGS", "paper_settings", "main"]

#: (model, img_size, steps) -> (repulsion threshold τr, linear cfg scale) of the released evaluation scripts.
PAPER_SETTINGS: dict[tuple[str, int, int], tuple[float, float]] = {
    ("lpd_l", 256, 20): (2.0, 4.8), ("lpd_xl", 256, 20): (2.0, 4.9), ("lpd_xxl", 256, 20): (3.0, 5.9),
    ("lpd_l", 256, 32): (2.0, 5.4), ("lpd_xl", 256, 32): (2.0, 5.0), ("lpd_l", 512, 48): (4.0, 7.3),
    ("lpd_xl", 512, 48): (4.0, 6.0),
}


def paper_settings(model: str | None, img_size: int, steps: int) -> tuple[float, float] | None:
    """``(τr, cfg)`` of the paper for this model, resolution and step count, or ``None``."""
    return PAPER_SETTINGS.get((str(model), int(img_size), int(steps)))


class LPDPipeline:
    """An LPD model and its tokenizer; ``name``: the preset (``lpd_l`` ...) whose :data:`PAPER_SETTINGS` are the defaults."""

    def __init__(self, model: torch.nn.Module, tokenizer: torch.nn.Module, name: str | None = None) -> None:
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    @classmethod
    def from_pretrained(cls, model: str = "lpd_l", img_size: int | None = None, *, checkpoint: str | os.PathLike | None = None,
                        vqgan_path: str | os.PathLike | None = None, device: torch.device | str | None = None) -> "LPDPipeline":
        """The released ``model`` at ``img_size`` (default 256; ``checkpoint`` / ``vqgan_path`` instead of the Hub), or a
        folder / Hub repository of ``python -m lpd.checkpoint export`` with its tokenizer; ``device``: CUDA if available."""
        from lpd.checkpoint import export_config, export_folder
        from lpd.distributed import resolve_device
        from lpd.models import PRESETS, load_lpd
        from lpd.tokenizer import make_tokenizer
        device = resolve_device(device)
        folder = export_folder(model) if model not in PRESETS and checkpoint is None else None
        if folder is None:
            net = load_lpd(checkpoint if checkpoint is not None else model, model=model, img_size=img_size or 256)
            return cls(net.to(device), make_tokenizer("vq", vqgan_path, device=device), name=model)
        config = export_config(folder)
        tok = config.get("tokenizer") or {}
        if vqgan_path is None and "file" in tok and "repo" not in tok:
            raise ValueError(f"{model} was trained with the tokenizer file {tok['file']}; pass its path as vqgan_path")
        tokenizer = make_tokenizer(tok.get("kind", "vq"), vqgan_path, tok.get("vq_config") if vqgan_path is None else None,
                                   tok.get("seed", 0), device)
        return cls(load_lpd(folder, img_size=img_size).to(device), tokenizer, name=config.get("model"))

    @property
    def img_size(self) -> int:
        return int(self.model.config.img_size)

    @property
    def grid_size(self) -> int:
        return int(self.model.grid_size)

    def sampling(self, steps: int, **settings: Any) -> SamplingConfig:
        """The paper's cfg and τr for ``steps`` (else cfg must be given; τr 2 at 16x16, 4 at 32x32), then ``settings``."""
        paper = paper_settings(self.name, self.img_size, steps)
        if settings.get("cfg") is None and paper is None:
            raise ValueError(f"no released cfg for {self.name or 'this model'} at {self.img_size} px and {steps} steps; "
                             f"pass cfg= (e.g. 4.0, or 1.0 for no guidance)")
        tr, cfg = paper or ((2.0 if self.grid_size <= 16 else 4.0), None)
        return SamplingConfig(**{"cfg": cfg, "repulsion_threshold": tr, **{k: v for k, v in settings.items() if v is not None}})

    @torch.no_grad()
    def __call__(self, labels: Sequence[int] | np.ndarray | torch.Tensor, *, steps: int = 20,
                 group_sizes: Sequence[int] | str | None = None, orders: np.ndarray | None = None, seed: int = 0,
                 start_index: int = 0, **settings: Any) -> np.ndarray:
        """uint8 images ``[len(labels), H, W, 3]`` in ``steps`` steps (or ``group_sizes``); ``orders``: a ``[B, N]`` table."""
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if labels.size == 0 or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be one or more integer class indices, got {labels.dtype} {labels.tolist()[:8]}")
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        n = self.grid_size**2
        sizes = parse_group_sizes(group_sizes, n) if group_sizes is not None else default_group_sizes(self.img_size, steps)
        sampling = self.sampling(len(sizes), **settings)
        indices = np.arange(start_index, start_index + labels.size, dtype=np.int64)
        if orders is not None:
            table = np.asarray(orders, dtype=np.int64)
            if table.ndim != 2 or table.shape[0] != labels.size:
                raise ValueError(f"orders must have one row per label: shape [{labels.size}, {n}], got {list(table.shape)}")
            rows = OrderSource("lpd", sizes, self.grid_size, table=table).rows(np.arange(labels.size))
        else:
            rows = OrderSource(sampling.order, sizes, self.grid_size, seed=seed, proximity_threshold=sampling.proximity_threshold,
                               repulsion_threshold=sampling.repulsion_threshold).rows(indices)
        return sample_batch(self.model, self.tokenizer, indices, labels, rows, sizes, sampling, seed)[0]

    def inpaint(self, image: Any, mask: Any, label: int | None, *, steps: int = 12, num: int = 1, seed: int = 0,
                paste: bool = False, prefill: str = "one", **settings: Any) -> dict[str, np.ndarray]:
        """Regenerate ``image`` under ``mask`` (white, or a region such as ``center``) as class ``label``:
        ``{"source", "masked", "edits [num, H, W, 3]"}``; cfg and τr default to the paper's 20-step values."""
        from lpd.editing import edit_images
        return edit_images(self.model, self.tokenizer, image, mask, label, num=num, steps=steps, seed=seed, paste=paste,
                           prefill=prefill, sampling=self.sampling(20, **settings))

    def outpaint(self, image: Any, label: int | None, *, region: str | None = None, **options: Any) -> dict[str, np.ndarray]:
        """Keep the centre of ``image`` and regenerate around it (``region`` default: a border of a quarter of the size)."""
        return self.inpaint(image, region or f"border:{self.img_size // 4}", label, **options)

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
    p.add_argument("--labels", type=_labels, default=[207, 360, 387, 974, 88, 979, 417, 279], help="comma-separated class indices")
    p.add_argument("--steps", type=int, default=20, help="decoding steps (the released group-size table)")
    p.add_argument("--group_sizes", default=None, help="an explicit schedule instead of --steps, e.g. '[1, 2, 4]*...'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained_ckpt", default=None, help="checkpoint file instead of the Hub download")
    p.add_argument("--vqgan_path", default=None, help="vq_ds16_c2i.pt instead of the Hub download")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--output", default="samples.png", help="PNG grid to write")
    add_sampling_args(p, {"cfg": None, "repulsion_threshold": None})  # None: the paper's value
    args = p.parse_args(argv)
    try:
        pipe = LPDPipeline.from_pretrained(args.model, args.img_size, checkpoint=args.pretrained_ckpt,
                                           vqgan_path=args.vqgan_path, device=args.device)
        settings = {k: v for k, v in vars(args).items() if k in SamplingConfig.__dataclass_fields__}
        images = pipe(args.labels, steps=args.steps, group_sizes=args.group_sizes, seed=args.seed, **settings)
        pipe.save_grid(images, args.output)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(images)} images ({args.model}, {pipe.img_size} px) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
