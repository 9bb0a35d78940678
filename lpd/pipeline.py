"""Images from class labels, and edits of images, in one call: a released model with its tokenizer.
``LPDPipeline.from_pretrained("lpd_l", 256)([207, 360], steps=20)`` samples at :data:`PAPER_SETTINGS`
(image ``k`` is image ``start_index + k`` of a ``main_eval.py`` run of the same seed);
``pipe.inpaint(image, "center", label=207)`` edits."""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lpd import hub
from lpd.config import HelpFormatter, check_labels
from lpd.distributed import resolve_device
from lpd.editing import edit_images
from lpd.evaluate import image_seed, sample_batch, sampling_orders
from lpd.files import (
    EXPORT_CONFIG,
    CheckpointError,
    check_output_path,
    export_config,
    load_checkpoint,
)
from lpd.images import save_grid, written_by_lpd
from lpd.models import PRESETS, load_lpd
from lpd.sampling import SamplingConfig, add_sampling_args, decode_tokens
from lpd.schedules import group_sizes as default_group_sizes
from lpd.schedules import parse_group_sizes
from lpd.text.sampling import check_prompts, model_text_encoder, prompt_tokens
from lpd.tokenizer import make_tokenizer, recorded_tokenizer, tokenizer_ref

__all__ = ["LPDPipeline", "PAPER_SETTINGS", "paper_settings", "add_paper_sampling_args", "main"]

#: (model, img_size, steps) -> (repulsion threshold τr, linear cfg) of the released evaluation.
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


_PYTHON_NAMES = {"pretrained_ckpt": "checkpoint"}  # flag -> Python argument, where they differ
_ARGUMENTS = frozenset(
    "checkpoint model img_size vqgan_path device labels steps group_sizes seed start_index image "
    "mask label num prefill paste prompts negative_prompt".split()
) | set(SamplingConfig.__dataclass_fields__)
_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("lpd_cli", default=False)


def python_words(text: str) -> str:
    """``--pretrained_ckpt /x.pth`` -> ``checkpoint="/x.pth"``, ``--cfg`` -> ``cfg=``."""

    def word(m: re.Match) -> str:
        name = _PYTHON_NAMES.get(m[1], m[1])
        return f"{name}=" + (f'"{m[2].strip()}"' if m[2] else "") if name in _ARGUMENTS else m[0]

    text = text.replace(", or --random_init for random weights", "")  # a main_eval.py flag
    return re.sub(r"(?<![\w-])--(\w+)( /[^\s,;]*[^\s,;.])?", word, text)


@contextlib.contextmanager
def _speaks_python() -> Iterator[None]:
    """User errors raised inside name Python arguments, unless in :func:`command_line`."""
    try:
        yield
    except (ValueError, OSError, CheckpointError) as e:
        if not _CLI.get() and e.args and isinstance(e.args[0], str):
            e.args = (python_words(e.args[0]), *e.args[1:])
        raise


@contextlib.contextmanager
def command_line() -> Iterator[None]:
    """Inside, pipeline errors keep naming the command-line flags (``--pretrained_ckpt``)."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


class LPDPipeline:
    """A model and its tokenizer; ``name``: the preset whose :data:`PAPER_SETTINGS` are the
    defaults, ``cfg``: the guidance scale where the paper has none."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: torch.nn.Module,
        name: str | None = None,
        cfg: float | None = None,
    ) -> None:
        self.model, self.tokenizer, self.name, self.cfg = model.eval(), tokenizer, name, cfg

    @functools.cached_property
    def text_encoder(self) -> Any:
        """The frozen text encoder the model records (a text model), loaded on first use."""
        return model_text_encoder(self.model, self.model.pos_embed.device)

    @classmethod
    @_speaks_python()
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        img_size: int | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        vqgan_path: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
    ) -> LPDPipeline:
        """``model``: a released preset (default ``lpd_l`` at 256 px) from the Hub, an export folder
        or Hub repository, or a training checkpoint (or ``checkpoint``: such a file, ``model`` its
        preset); size, classes, tokenizer and cfg come from it; ``vqgan_path``: the VQ file."""
        device = resolve_device(device)
        if checkpoint is None and (model is None or model in PRESETS):  # a released model, by name
            model, size = model or "lpd_l", img_size or 256
            files = hub.resolve_model_files(model, size, vqgan_path=vqgan_path)
            net = load_lpd(files["checkpoint"], model=model, img_size=size).to(device)
            return cls(net, make_tokenizer("vq", files["VQ tokenizer"], device=device), name=model)
        if checkpoint is None:  # a path or repository as the first argument
            model, checkpoint = None, model
        source = os.fspath(checkpoint)
        path = hub.resolve_user_checkpoint(source)
        if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
            meta = export_config(path)
        else:
            args = load_checkpoint(path).get("args") or {}
            args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
            meta = {"model": args.get("model"), "tokenizer": tokenizer_ref(args)}
            meta["training"] = {"args": args}
        trained = (meta.get("training", {}).get("args") or {}).get("cfg")
        cfg = (meta.get("sampling") or {}).get("cfg", trained)
        tokenizer = recorded_tokenizer(meta.get("tokenizer") or {}, vqgan_path, device, source)
        net = load_lpd(path, model=model, img_size=img_size).to(device)
        return cls(net, tokenizer, model or meta.get("model"), cfg)

    @property
    def img_size(self) -> int:
        return self.model.img_size

    @property
    def grid_size(self) -> int:
        return int(self.model.grid_size)

    @_speaks_python()
    def sampling(self, steps: int, **settings: Any) -> SamplingConfig:
        """The paper's cfg and τr for ``steps``, else ``self.cfg`` and τr 2 (16x16) or 4; then
        ``settings``."""
        fallback = (2.0 if self.grid_size <= 16 else 4.0, self.cfg)
        tr, cfg = paper_settings(self.name, self.img_size, steps) or fallback
        if settings.get("cfg") is None and cfg is None:
            raise ValueError(
                f"no released cfg for {self.name or 'this model'} at {self.img_size} "
                f"px and {steps} steps; pass --cfg (e.g. 4.0, or 1.0 for no guidance)"
            )
        given = {k: v for k, v in settings.items() if v is not None}
        return SamplingConfig(**{"cfg": cfg, "repulsion_threshold": tr, **given})

    @torch.no_grad()
    @_speaks_python()
    def __call__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        prompts: Sequence[str] | str | None = None,
        negative_prompt: str | None = None,
        steps: int = 20,
        group_sizes: Sequence[int] | str | None = None,
        orders: np.ndarray | None = None,
        seed: int = 0,
        start_index: int = 0,
        **settings: Any,
    ) -> np.ndarray:
        """uint8 images ``[B, H, W, 3]`` of ``labels`` (a text model: ``prompts``, guided against
        ``negative_prompt``) in ``steps`` steps or ``group_sizes``; ``orders``: ``[B, N]``."""
        if (prompts is None) != (self.model.text is None) or (
            labels is not None if prompts is not None else negative_prompt is not None
        ):
            raise ValueError(
                "a text-conditional model takes --prompt (and no --labels)"
                if self.model.text is not None
                else "this model is class-conditional: give --labels, not --prompt"
            )
        if prompts is not None:
            prompts = check_prompts(prompts)
            labels = np.zeros(len(prompts), dtype=np.int64)  # one row per prompt
        labels = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).reshape(-1)
        if labels.size == 0 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"--labels must be one or more integer class indices, "
                f"got {labels.dtype} {labels.tolist()[:8]}"
            )
        labels = check_labels(labels, labels.size, self.model.class_num)
        if start_index < 0:
            raise ValueError(f"--start_index must be >= 0, got {start_index}")
        n, b = self.grid_size**2, labels.size
        sizes = None if group_sizes is None else parse_group_sizes(group_sizes, n)
        sizes = sizes or default_group_sizes(self.img_size, steps)
        sampling = self.sampling(len(sizes), **settings)
        indices = np.arange(start_index, start_index + b, dtype=np.int64)
        table = None if orders is None else np.asarray(orders, dtype=np.int64)
        if table is not None and (table.ndim != 2 or table.shape[0] != b):
            raise ValueError(
                f"orders must have one row per label: shape [{b}, {n}], got {list(table.shape)}"
            )
        source = sampling_orders(sampling, sizes, self.grid_size, seed, table)
        rows = source.rows(indices if table is None else np.arange(b))
        if prompts is not None:
            gens = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]
            encoder, args = self.text_encoder, (rows, sizes, sampling, gens, negative_prompt)
            tokens = prompt_tokens(self.model, encoder, prompts, *args)
            return decode_tokens(self.tokenizer, tokens, sampling)
        args = (indices, labels, rows, sizes, sampling, seed)
        return sample_batch(self.model, self.tokenizer, *args)[0]

    @_speaks_python()
    def inpaint(
        self,
        image: Any,
        mask: Any,
        label: int | None,
        *,
        steps: int = 12,
        num: int = 1,
        seed: int = 0,
        paste: bool = False,
        prefill: str = "one",
        **settings: Any,
    ) -> dict[str, np.ndarray]:
        """``{"source", "masked", "edits"}``: ``image`` regenerated under ``mask`` (white, a region)
        as class ``label``; cfg and τr default to the paper's 20-step values."""
        options = dict(num=num, steps=steps, seed=seed, paste=paste, prefill=prefill)
        options["sampling"] = self.sampling(20, **settings)
        return edit_images(self.model, self.tokenizer, image, mask, label, **options)

    def outpaint(
        self, image: Any, label: int | None, *, region: str | None = None, **options: Any
    ) -> dict[str, np.ndarray]:
        """Keep the centre of ``image`` and regenerate around it (default: a quarter-size border)."""
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


def add_paper_sampling_args(parser: argparse.ArgumentParser, otherwise: dict[str, str]) -> None:
    """The sampling flags; cfg and τr default to :data:`PAPER_SETTINGS`, else ``otherwise``."""
    add_sampling_args(parser, {"cfg": None, "repulsion_threshold": None})  # None: set later
    for a in parser._actions:
        if a.dest in otherwise:
            a.help += f" (default: the paper's for the model, size and steps; {otherwise[a.dest]})"


IMAGENET_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # golden retriever, otter, panda, ...


def _labels(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class indices such as 207,360, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``python -m lpd.pipeline``."""
    text = "Sample images of given classes with an LPD model into a PNG grid."
    kw = dict(allow_abbrev=False, formatter_class=HelpFormatter, description=text)
    p = argparse.ArgumentParser("python -m lpd.pipeline", **kw)
    add, labels = p.add_argument, ",".join(map(str, IMAGENET_LABELS))
    add(
        "--model",
        help="released preset lpd_l, lpd_xl, lpd_xxl (default: lpd_l without "
        "--pretrained_ckpt), or an exported folder / Hub repository",
    )
    add("--img_size", type=int, help="default: the checkpoint's; 256 for a preset")
    add(
        "--labels",
        type=_labels,
        help="comma-separated class indices "
        f"(default: {labels} of 1000 classes, else the first ten classes)",
    )
    add(
        "--prompt",
        action="append",
        help="a text-conditional model: a prompt (repeat the flag for several)",
    )
    add("--negative_prompt", help="prompts: the guidance rows' text")
    add("--steps", type=int, default=20, help="decoding steps (the released group-size table)")
    add("--group_sizes", help="an explicit schedule instead of --steps, e.g. '[1, 2, 4]*...'")
    add("--seed", type=int, default=0)
    add(
        "--pretrained_ckpt",
        help="checkpoint file or folder (a training run's, or a released file "
        "with --model) instead of the Hub download; its size, classes and tokenizer count",
    )
    add("--vqgan_path", help="vq_ds16_c2i.pt instead of the Hub download")
    add("--device", help="default: cuda if available, else cpu")
    add("--output", default="samples.png", help="PNG grid to write")
    add("--overwrite", action="store_true", help="replace an --output file that lpd did not write")
    cfg = "else the cfg the checkpoint's training evaluated at"
    tr = "else 2 at 16x16 tokens, 4 at 32x32"
    add_paper_sampling_args(p, {"cfg": cfg, "repulsion_threshold": tr})
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one ``error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        inputs = [("--pretrained_ckpt", args.pretrained_ckpt), ("--vqgan_path", args.vqgan_path)]
        checks = (args.output, "--output", inputs, args.overwrite, written_by_lpd)
        if problem := check_output_path(*checks):
            raise ValueError(problem)
        with command_line():
            kw = dict(
                checkpoint=args.pretrained_ckpt, vqgan_path=args.vqgan_path, device=args.device
            )
            pipe = LPDPipeline.from_pretrained(args.model, args.img_size, **kw)
            classes = pipe.model.config.class_num
            first = IMAGENET_LABELS if classes == 1000 else list(range(min(10, classes)))
            labels = args.labels or first
            if args.prompt or pipe.model.text is not None:
                labels = args.labels  # no default classes: a text model takes prompts
            sizes = args.group_sizes and parse_group_sizes(args.group_sizes, pipe.grid_size**2)
            given = {k: getattr(args, k) for k in SamplingConfig.__dataclass_fields__}
            steps = len(sizes) if sizes else args.steps
            sampling = pipe.sampling(steps, **given)
            run = dict(steps=args.steps, group_sizes=args.group_sizes, seed=args.seed)
            prompts = dict(prompts=args.prompt, negative_prompt=args.negative_prompt)
            images = pipe(labels, **prompts, **run, **sampling.to_dict())
            pipe.save_grid(images, args.output, ncol=min(len(images), 10))
    except (OSError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(images)} images ({pipe.name or 'model'}, {pipe.img_size} px, "
        f"{f'prompts {args.prompt}' if args.prompt else f'classes {labels}'}, cfg "
        f"{sampling.cfg:g}, τr {sampling.repulsion_threshold:g}) to {args.output}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
