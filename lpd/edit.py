"""Edit an image with an LPD model from the command line: inpainting, outpainting, class change, or
a caption (``--prompt``) for a text-to-image model.

    python -m lpd.edit --model lpd_l --img_size 256 --image in.png --region center --label 207 \\
        --steps 12 --num 4 --seed 0 --output edited.png
    python -m lpd.edit --config configs/demo.yaml --pretrained_ckpt outputs/demo/train/checkpoint-last.pth \\
        --image digit.png --region bottom --label 3 --output digit_edit.png

Writes ``--output`` (a grid: the source, the masked source, the edits) and each edit as ``<output stem>_<k>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

from lpd import hub
from lpd.config import ConfigError, check_positive, new_parser, parse_args_with_config, yaml_mapping
from lpd.distributed import resolve_device
from lpd.files import CheckpointError, check_output_path
from lpd.images import load_mask, read_image, save_grid, write_png, written_by_lpd
from lpd.models import load_lpd
from lpd.pipeline import LPDPipeline, add_paper_sampling_args, command_line
from lpd.sampling import SamplingConfig
from lpd.text.prompts import encode_ids
from lpd.text.sampling import model_text_encoder
from lpd.tokenizer import make_tokenizer

SAMPLING = tuple(SamplingConfig.__dataclass_fields__)


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("python -m lpd.edit", __doc__)
    a = p.add_argument
    a(
        "--config",
        help="YAML config (e.g. configs/demo.yaml): its model and tokenizer keys are used",
    )
    a("--model", help="preset of a released checkpoint: lpd_l, lpd_xl, lpd_xxl")
    a("--img_size", type=int, help="256 or 512 (default: the checkpoint's)")
    a("--pretrained_ckpt", help="checkpoint file (default: the released one of --model)")
    a("--model_config", type=yaml_mapping, help=argparse.SUPPRESS)
    a("--tokenizer", choices=["vq", "palette"], default="vq")
    a("--vqgan_path", help="vq_ds16_c2i.pt (default: from the Hub)")
    a("--vq_config", type=yaml_mapping, help="tokenizer arguments (palette: {levels: 4})")
    a("--image", required=True, help="the image to edit (centre-cropped to the model's size)")
    where = p.add_mutually_exclusive_group(required=True).add_argument
    where("--mask", help="mask image: white = regenerate")
    where("--region", help="box:x0,y0,x1,y1 | left | right | top | bottom | center | border:PX")
    cond = p.add_mutually_exclusive_group().add_argument
    cond("--label", type=int, help="class of the edit (default: unconditional, cfg 1)")
    cond("--prompt", help="caption of the edit (text-to-image models)")
    a("--steps", type=int, default=12, help="decoding steps for the regenerated tokens")
    a("--num", type=int, default=4, help="how many edits")
    a("--seed", type=int, default=0)
    prefill = "layout of the known tokens"
    a("--prefill", choices=["one", "schedule"], default="one", help=prefill)
    a("--paste", action="store_true", help="paste the original pixels back outside the mask")
    a("--device", default="cpu")
    a("--output", default="edited.png", help="grid PNG; the edits go next to it")
    a("--overwrite", action="store_true", help="replace output files that lpd did not write")
    tr = "else 2 at 16x16 tokens, 4 at 32x32"
    add_paper_sampling_args(p, {"cfg": "else --config's", "repulsion_threshold": tr})
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one ``error:`` line and return 2."""
    try:
        take = (*"model img_size model_config tokenizer vqgan_path vq_config".split(), *SAMPLING)
        args = parse_args_with_config(build_parser(), argv, take=take)
        for flag, value in (("--steps", args.steps), ("--num", args.num)):
            check_positive(value, flag)
        names = "image mask pretrained_ckpt vqgan_path config".split()
        inputs = [(f"--{k}", getattr(args, k)) for k in names]
        stem, _ = os.path.splitext(args.output)
        for path in [args.output, *(f"{stem}_{k}.png" for k in range(args.num))]:
            flag = "--output" if path == args.output else "the edit"
            if problem := check_output_path(path, flag, inputs, args.overwrite, written_by_lpd):
                raise ConfigError(problem)
        read_image(args.image)  # unreadable inputs are refused before the model is loaded
        if args.mask is not None:
            try:
                load_mask(args.mask, None)
            except ValueError as e:
                raise ConfigError(f"--mask {args.mask}: {e}") from None
        device = resolve_device(args.device)
        if not (args.pretrained_ckpt or args.model):
            raise ConfigError(
                "no model: pass --model (lpd_l, lpd_xl, lpd_xxl) or --pretrained_ckpt FILE"
            )
        vq = args.tokenizer == "vq" and (args.vqgan_path or args.vq_config is None)
        where = dict(vqgan_path=args.vqgan_path, checkpoint=args.pretrained_ckpt)
        files = hub.resolve_model_files(args.model, args.img_size or 256, vq=vq, **where)
        model = load_lpd(files["checkpoint"], model=args.model, img_size=args.img_size).to(device)
        label = args.label
        if (model.config.condition == "text") != (args.prompt is not None):
            text = "the model is text-to-image: give --prompt TEXT"
            if args.prompt is not None:
                text = "--prompt is for text-to-image models; this model takes --label"
            raise ConfigError(text)
        if args.prompt is not None:
            encoder = model_text_encoder(model, device)
            label = encode_ids(encoder, *encoder.tokenize([args.prompt]))
        vq_path = files.get("VQ tokenizer", args.vqgan_path)
        tokenizer = make_tokenizer(args.tokenizer, vq_path, args.vq_config, args.seed, device)
        pipe = LPDPipeline(model, tokenizer, name=args.model)
        settings = {k: getattr(args, k) for k in SAMPLING}
        if label is None:
            settings["cfg"] = 1.0  # unconditional
        with command_line():
            mask = args.region if args.mask is None else args.mask
            run = dict(steps=args.steps, num=args.num, seed=args.seed, paste=args.paste)
            out = pipe.inpaint(args.image, mask, label, **run, prefill=args.prefill, **settings)
    except (OSError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    edits, shown = [f"edit {k}" for k in range(len(out["edits"]))], [out["source"], out["masked"]]
    tile, labels = out["source"].shape[0], ["source", "masked", *edits]
    save_grid(args.output, shown + list(out["edits"]), 2 + len(edits), tile, col_labels=labels)
    for k, im in enumerate(out["edits"]):
        write_png(f"{stem}_{k}.png", np.ascontiguousarray(im))
    n = len(out["edits"])
    print(f"wrote {args.output} (source, masked source, {n} edits) and {stem}_0..{n - 1}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
