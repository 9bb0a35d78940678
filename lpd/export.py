"""Sharing a checkpoint: ``export`` (weights, config, model card), the Hub upload, ``consolidate``.

``python -m lpd.checkpoint consolidate RUN_DIR OUT.pth`` writes a sharded (FSDP) checkpoint as one
file; ``python -m lpd.checkpoint export CKPT OUT_DIR [--push_to_hub REPO]`` a shareable folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import huggingface_hub
import torch
from safetensors.torch import save

from lpd import hub
from lpd.files import (
    EXPORT_CARD,
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    TMP_PREFIX,
    CheckpointError,
    atomic_write_bytes,
    check_finite,
    check_output_path,
    checkpoint_args,
    export_config,
    load_checkpoint,
    load_into,
    save_checkpoint,
    state_dict_digest,
    temp_dir_for,
)
from lpd.models import LPD, checkpoint_config
from lpd.parallel import last_checkpoint
from lpd.sampling import SamplingConfig
from lpd.tokenizer import tokenizer_ref

_CARD = """---
library_name: lpd
tags: [lpd, image-generation, class-conditional, autoregressive]
---

# {name} at {c[img_size]} px

A class-conditional Locality-aware Parallel Decoding (LPD) image generator: {millions:.1f}M \
parameters (width {c[embed_dim]}, depth {c[depth]}, {c[num_heads]} heads), {c[class_num]} \
classes, tokens of a {c[vocab_size]}-entry VQ codebook ({tokenizer}). Weights: {weights} after \
epoch {t[epoch]} (global step {t[global_step]}), sha256 {sha}...

{metrics}## Sampling settings{during}

{settings}

## Use

```python
from lpd.pipeline import LPDPipeline

pipe = LPDPipeline.from_pretrained("{ref}")   # or lpd.models.load_lpd("{ref}"): the LPD module
images = pipe({labels}, steps={run_steps}, cfg={cfg})   # uint8 [{n}, H, W, 3]
```
{evaluation}"""


def _model_card(config: dict[str, Any], measured: dict[str, Any] | None, ref: str) -> str:
    """README.md: the model, its scores (a ``main_eval.py`` metrics.json), its sampling settings,
    its use (``ref``: its Hub repository or folder; ImageNet only for 1000-class models)."""
    c, train, args = config["model_config"], config["training"], config["training"]["args"]
    if measured:
        sampling = measured.get("sampling", {})
        steps = len(measured.get("settings", {}).get("group_sizes", [])) or None
        scores = [measured.get(k) for k in ("fid", "inception_score", "num_images")]
        metrics = "## Metrics\n\n| FID | IS | images | steps |\n| ---: | ---: | ---: | ---: |\n"
        metrics += "| {} | {} | {} | {} |\n\n".format(*scores, steps)
    else:
        sampling = {k: args[k] for k in SamplingConfig.__dataclass_fields__ if k in args}
        steps, metrics = args.get("eval_steps"), ""
    cfg, imagenet = sampling.get("cfg", 4.0), c["class_num"] == 1000
    labels = [207, 360, 387, 974] if imagenet else list(range(min(4, c["class_num"])))
    run = f"--pretrained_ckpt {ref} --generation_steps {steps or 20} --cfg {cfg}"
    return _CARD.format(
        name=config.get("model") or "LPD",
        c=c,
        t={"epoch": None, "global_step": None} | train,
        millions=config["parameters"] / 1e6,
        tokenizer=json.dumps(config["tokenizer"]),
        weights=config["weights"],
        sha=config["weights_sha256"][:16],
        metrics=metrics,
        during="" if measured else " (of the evaluation during training)",
        settings="\n".join(f"* {k}: {v}" for k, v in [("steps", steps), *sampling.items()]),
        ref=ref,
        labels=labels,
        run_steps=steps or 20,
        cfg=cfg,
        n=len(labels),
        evaluation=f"\nEvaluation on ImageNet: `python main_eval.py {run} --output_dir out/`.\n"
        if imagenet
        else "",
    )


def export(
    ckpt: str,
    out_dir: str,
    *,
    model: str | None = None,
    use_ema: bool = False,
    metrics: str | None = None,
    repo: str | None = None,
    overwrite: bool = False,
    sampling: Mapping[str, Any] | None = None,
) -> str:
    """Write the weights of ``ckpt`` (file or sharded folder) as the folder ``out_dir`` (weights,
    config, a model card with the scores of a ``main_eval.py`` ``metrics.json``; ``sampling``: the
    default sampling settings recorded in the config); the folder appears whole; its path."""
    existing = _check_export_dir(ckpt, out_dir, overwrite)
    state = load_checkpoint(ckpt)
    key = "model_ema" if use_ema else "model"
    if not isinstance(state.get(key), Mapping):
        raise CheckpointError(
            f"{ckpt!r} holds no EMA weights (it was trained without --ema_decay); drop --use_ema"
            if use_ema
            else f"{ckpt!r} has no 'model' entry: give a training checkpoint"
        )
    sd = {k: v.contiguous() for k, v in state[key].items()}
    check_finite(sd, f"{ckpt!r}")
    with torch.device("meta"):
        net = LPD(checkpoint_config(state, sd, ckpt, model))
    hint = "pass --model with the architecture it was trained as"
    load_into(net, sd, source=f"{ckpt!r}", hint=hint, assign=True)
    digest, measured = state_dict_digest(sd), None
    if metrics:
        with open(metrics, encoding="utf-8") as f:
            measured = json.load(f)
        scored = (measured.get("settings") or {}).get("weights_sha256")
        if scored not in (None, digest):
            raise CheckpointError(
                f"--metrics {metrics}: these scores were measured on other weights (sha256 "
                f"{scored[:12]}... vs {digest[:12]}...); give the metrics.json of a main_eval.py "
                f"run of this checkpoint" + ("" if use_ema else " (or add --use_ema)")
            )
    args = checkpoint_args(state)
    config = {
        "library": "lpd",
        "model": model or args.get("model"),
        "model_config": net.config.to_dict(),
        "img_size": net.config.img_size,
        "weights": "ema" if use_ema else "model",
        "weights_sha256": digest,
        "parameters": sum(v.numel() for v in sd.values()),
        "tokenizer": tokenizer_ref(args),
        "training": {k: state.get(k) for k in ("epoch", "step", "global_step")} | {"args": args},
    }
    if sampling:
        config["sampling"] = dict(sampling)
    config = json.loads(json.dumps(config, default=str))
    name = os.path.basename(os.path.normpath(out_dir))  # the card names no local path
    files = {
        EXPORT_WEIGHTS: save(sd, metadata={"format": "pt"}),
        EXPORT_CONFIG: json.dumps(config, indent=2).encode(),
        EXPORT_CARD: _model_card(config, measured, repo or f"path/to/{name}").encode(),
    }
    tmp = out_dir if existing else temp_dir_for(out_dir)  # a new folder appears whole
    try:
        for name, data in files.items():
            atomic_write_bytes(os.path.join(tmp, name), lambda f: f.write(data))
        if not existing:
            os.rename(tmp, out_dir)
    finally:
        if not existing:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_export_dir(ckpt: str, out_dir: str, overwrite: bool) -> bool:
    """Whether ``out_dir`` exists (empty, or an earlier export, replaced with ``overwrite``);
    anything else is refused: a folder holding the source or other files is never written into."""
    src, out = os.path.realpath(ckpt), os.path.realpath(out_dir)
    if os.path.commonpath([src, out]) in (src, out):
        raise CheckpointError(
            f"OUT_DIR {out_dir} holds the checkpoint {ckpt} (or lies inside it); export into a new folder"
        )
    if not os.path.lexists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"OUT_DIR {out_dir} is a file; give a new folder")
    # temporary files of a killed export do not count
    names = {n for n in os.listdir(out_dir) if not n.startswith(TMP_PREFIX)}
    if other := sorted(names - {EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD}):
        raise CheckpointError(
            f"OUT_DIR {out_dir} holds files that are not an export's ({', '.join(other[:5])}"
            f"{', ...' if len(other) > 5 else ''}); export into a new or empty folder"
        )
    if names and not overwrite:
        raise CheckpointError(
            f"OUT_DIR {out_dir!r} exists; choose another folder, or --overwrite to replace it"
        )
    try:
        return not names or bool(export_config(out_dir))
    except CheckpointError as e:
        raise CheckpointError(
            f"OUT_DIR {out_dir} is not an earlier export ({e}); export into a new folder"
        ) from None


def push_to_hub(folder: str, repo: str, private: bool = False) -> str:
    """Upload an exported folder to the Hub model repository ``repo`` in one commit; its URL."""
    try:
        huggingface_hub.create_repo(repo, exist_ok=True, private=private)
        huggingface_hub.upload_folder(repo_id=repo, folder_path=folder, commit_message="lpd export")
    except Exception as e:  # noqa: BLE001 - network, authentication, permissions: the cause told
        raise CheckpointError(
            f"--push_to_hub {repo}: the upload failed ({hub.cause(e)}); nothing was committed. The "
            f"export {folder} is complete: upload it later with `hf upload {repo} {folder}`"
        ) from e
    return f"https://huggingface.co/{repo}"


def consolidate(run_dir: str, out: str, overwrite: bool = False) -> dict[str, Any]:
    """Write the run's (or folder's) sharded checkpoint as the single file ``out``; its content."""
    if problem := check_output_path(out, "OUT", overwrite=True):
        raise CheckpointError(problem)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"OUT {out} exists; --overwrite replaces it")
    state = load_checkpoint(last_checkpoint(run_dir, sharded=True) or run_dir)
    state.pop("sharded", None)
    save_checkpoint(state, out)
    return state


_OVERWRITE = "replace an existing output"
_COMMANDS = {  # sub-command: (its help, {argument: help})
    "consolidate": (
        "a sharded (--fsdp) checkpoint as one .pth file of the released format",
        {
            "run_dir": "an --fsdp run's output folder (its checkpoint-last) or a checkpoint folder",
            "out": "the .pth file to write",
            "--overwrite": _OVERWRITE,
        },
    ),
    "export": (
        "model.safetensors + config.json + README.md, optionally uploaded to the Hub",
        {
            "ckpt": "a checkpoint file (.pth) or sharded checkpoint folder",
            "out_dir": "the folder to write",
            "--model": "preset of a released checkpoint that does not record its architecture",
            "--use_ema": "export the EMA weights (runs trained with --ema_decay)",
            "--metrics": "a main_eval.py metrics.json of these weights, shown in the model card",
            "--push_to_hub": "upload the folder to this Hub model repository",
            "--private": "with --push_to_hub: create the repository private",
            "--overwrite": _OVERWRITE,
        },
    ),
}
_SETTINGS = dict.fromkeys(["--use_ema", "--private", "--overwrite"], {"action": "store_true"})
_SETTINGS["--push_to_hub"] = {"metavar": "REPO"}


def main(argv: Sequence[str] | None = None) -> int:
    """``consolidate`` and ``export``; errors print one ``error:`` line and return 2."""
    fmt, prog = argparse.RawDescriptionHelpFormatter, "python -m lpd.checkpoint"
    p = argparse.ArgumentParser(prog, description=__doc__, formatter_class=fmt, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    for command, (text, flags) in _COMMANDS.items():
        q = sub.add_parser(command, help=text)
        for flag, text in flags.items():
            q.add_argument(flag, help=text, **_SETTINGS.get(flag, {}))
    args = p.parse_args(argv)
    try:
        if args.command == "consolidate":
            state = consolidate(args.run_dir, args.out, args.overwrite)
            kept = "model and model_ema" if "model_ema" in state else "model"
            where = f"epoch {state.get('epoch')}, step {state.get('step')}"
            print(f"wrote {args.out} ({where}, {kept})")
            return 0
        if args.push_to_hub and hub.offline():
            raise CheckpointError(
                "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; export without it "
                "and upload the folder later with `hf upload REPO OUT_DIR`"
            )
        kw = {k: getattr(args, k) for k in ("model", "use_ema", "metrics", "overwrite")}
        out = export(args.ckpt, args.out_dir, repo=args.push_to_hub, **kw)
        print(f"wrote {out}: {EXPORT_WEIGHTS}, {EXPORT_CONFIG}, {EXPORT_CARD}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(out, args.push_to_hub, args.private)}")
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
