"""Checkpoint I/O: safe loading (``weights_only=True``), strict key checks, atomic writes, sharing.

``python -m lpd.checkpoint consolidate RUN_DIR OUT.pth`` writes a sharded (FSDP) checkpoint as one
file; ``python -m lpd.checkpoint export CKPT OUT_DIR [--push_to_hub REPO]`` a shareable folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CheckpointError",
    "load_checkpoint",
    "load_state_dict",
    "check_state_dict",
    "load_into",
    "interpolate_pos_embed",
    "save_checkpoint",
    "atomic_write_bytes",
    "TMP_PREFIX",
    "state_dict_digest",
    "check_finite",
    "check_output_path",
    "same_file",
    "lock_folder",
    "LOCK_NAME",
    "temp_dir_for",
    "replace_dir",
    "export_folder",
    "export_config",
    "read_export",
    "tokenizer_ref",
    "export",
    "push_to_hub",
]

TMP_PREFIX = ".tmp-"  # temporary files of atomic_write_bytes (left only by a killed process)
LOCK_NAME = ".lock"  # the lock file of lock_folder


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read or does not fit the model."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint dict read with ``weights_only=True``; a sharded folder gives its whole weights."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from lpd.parallel import read_sharded

        return read_sharded(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name and the reason (not torch's advice to unpickle)
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
        reason = (
            found.group(1) if found else (str(e).splitlines() or [type(e).__name__])[0]
        ).strip()
        raise CheckpointError(
            f"could not load checkpoint {path!r} with weights_only=True ({reason}). The file is truncated, "
            f"not a PyTorch checkpoint, or contains objects other than tensors, containers and "
            f"argparse.Namespace (which lpd refuses to unpickle)."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path!r} holds a {type(obj).__name__}, expected a dict")
    return obj


def load_state_dict(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (its ``'model'``, or a bare state dict) or of an export."""
    folder = export_folder(os.fspath(path))
    if folder is not None:
        return read_export(folder)[1]
    obj = load_checkpoint(path, map_location)
    if isinstance(obj.get("model"), Mapping):
        return dict(obj["model"])
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    raise CheckpointError(
        f"checkpoint {os.fspath(path)!r} has no 'model' entry and is not a bare state dict "
        f"(top-level keys: {sorted(map(str, obj))[:10]})"
    )


def check_state_dict(
    expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and shape mismatches (``"key: checkpoint [..] vs model [..]"``)."""
    missing = sorted(k for k in expected if k not in given)
    unexpected = sorted(k for k in given if k not in expected)
    mismatched = sorted(
        f"{k}: checkpoint {list(given[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    )
    return missing, unexpected, mismatched


def _format_keys(title: str, keys: list[str], limit: int = 20) -> str:
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (
        f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    )
    return f"\n  {title} ({len(keys)}): {shown}"


def load_into(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str = "checkpoint",
    hint: str = "",
    assign: bool = False,
) -> None:
    """Strict load (``assign``: the tensors become the parameters); one error lists every discrepancy."""
    missing, unexpected, mismatched = check_state_dict(module.state_dict(), state_dict)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not match the model {type(module).__name__}:"
            + _format_keys("missing keys", missing)
            + _format_keys("unexpected keys", unexpected)
            + _format_keys("shape mismatches", mismatched)
            + (f"\n  {hint}" if hint else "")
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)


def check_finite(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or inf, naming the tensors."""
    bad = sorted(
        k
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not bool(torch.isfinite(v).all())
    )
    if bad:
        raise CheckpointError(
            f"{source} has non-finite weights (NaN or inf) in {', '.join(bad[:10])}"
            f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}; the file is damaged or the "
            f"run diverged: use an earlier checkpoint"
        )


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resize ``pos_embed [1, 1 + n, D]`` to ``[1, 1 + num_tokens, D]`` (square grids), bicubic; slot 0 kept."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, 1 + N, D], got {list(pos_embed.shape)}")
    old_n = pos_embed.shape[1] - 1
    old_g, new_g = math.isqrt(old_n), math.isqrt(num_tokens)
    if old_g * old_g != old_n or new_g * new_g != num_tokens:
        raise ValueError(
            f"pos_embed interpolation needs square grids, got {old_n} -> {num_tokens} positions"
        )
    if old_n == num_tokens:
        return pos_embed
    D = pos_embed.shape[2]
    grid = pos_embed[0, 1:].float().reshape(old_g, old_g, D).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(new_g, new_g), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(1, new_g * new_g, D).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_for(path: str) -> str:
    """A new temporary folder next to ``path`` (to be renamed to it), with a plain folder's permissions."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, write_fn, fsync: bool = True) -> None:
    """Call ``write_fn(fileobj)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.
    ``fsync=False`` skips the flushes to disk (for many small files a rerun checks anyway)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + "-", dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give what a plain open() would
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        _fsync_dir(folder)


def state_dict_digest(state: Mapping[str, torch.Tensor] | torch.nn.Module) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes: equal digests, equal weights."""
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if isinstance(t, torch.Tensor):
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
            h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (after links; existing files are compared by inode)."""
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
    except OSError:  # either is missing
        return False


def check_output_path(
    path: str,
    flag: str,
    inputs: Sequence[tuple[str, Any]] = (),
    overwrite: bool = False,
    ours: Any = None,
) -> str | None:
    """Why ``path`` cannot be written: a folder, no writable folder to create it in, one of ``inputs``
    (``(flag, path)`` pairs: an output is never an input) or an existing file that ``ours(path)`` does
    not recognise as written by lpd (without ``overwrite``); else None."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder; give the path of a file to write (it may lie inside that folder)"
    for in_flag, source in inputs:
        if source is not None and same_file(path, source):
            return f"{flag} {path} is also {in_flag} {source}: an output is never an input; choose another path"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # missing folders are created on writing
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        return f"{flag} {path}: {folder} is a file, not a folder; choose another path"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag} {path}: the folder {folder} is not writable; choose another path"
    if os.path.lexists(path) and not overwrite and not (ours and ours(path)):
        return (
            f"{flag} {path} exists{' and was not written by lpd' if ours else ''}; choose another name, or "
            f"--overwrite to replace it"
        )
    return None


def lock_folder(folder: str) -> int | None:
    """Hold ``folder`` for this process (``flock`` of ``folder/.lock``, released when the process ends, even
    killed): the descriptor to close, None where the file system has no locks; BlockingIOError when held."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise BlockingIOError(f"{folder} is in use by process {holder or '(unknown)'}") from None
    except OSError:  # no locks on this file system
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {os.uname().nodename}".encode(), 0)
    return fd


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` written atomically."""
    atomic_write_bytes(path, lambda f: torch.save(dict(obj), f))


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished folder ``tmp`` to ``path``; a folder there is kept as ``path.old`` until then."""
    old = path + ".old"
    if os.path.isdir(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


EXPORT_CONFIG, EXPORT_WEIGHTS, EXPORT_CARD = "config.json", "model.safetensors", "README.md"


def export_folder(path: str) -> str | None:
    """The local folder of an exported model: ``path``, or the cached files of the Hub repository
    ``path`` (``owner/name`` that is no local path); None for anything else."""
    if os.path.isfile(os.path.join(path, EXPORT_CONFIG)):
        return path
    if (
        os.path.exists(path)
        or not re.fullmatch(r"[\w.-]+/[\w.-]+", path)
        or path.endswith((".pth", ".pt", ".bin", ".ckpt"))
    ):
        return None
    from lpd import hub

    for name in (EXPORT_CONFIG, EXPORT_WEIGHTS):
        local = hub.hub_file(
            path,
            name,
            what="exported LPD model",
            flag="--pretrained_ckpt",
            hint=f"or, if {path} was meant as a folder on this machine: it does not exist",
        )
    return os.path.dirname(local)


def export_config(folder: str) -> dict[str, Any]:
    """The ``config.json`` of an exported model folder."""
    path = os.path.join(folder, EXPORT_CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_config"), dict):
        raise CheckpointError(f"{path} has no model_config mapping: it is not an lpd export")
    return config


def read_export(folder: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the ``model.safetensors`` weights of an exported model (reading runs no code)."""
    from safetensors.torch import load_file

    config = export_config(folder)
    try:
        return config, load_file(os.path.join(folder, EXPORT_WEIGHTS))
    except Exception as e:  # noqa: BLE001 - re-raised with the file and the reason
        raise CheckpointError(f"could not read {os.path.join(folder, EXPORT_WEIGHTS)}: {e}") from e


def tokenizer_ref(args: Mapping[str, Any]) -> dict[str, Any]:
    """The tokenizer of training: the released LlamaGen VQ, a file, or a seeded build."""
    from lpd.hub import VQ_FILENAME, VQ_REPO

    kind = args.get("tokenizer", "vq")
    if args.get("vqgan_path"):
        return {"kind": kind, "file": os.path.basename(str(args["vqgan_path"]))}
    if args.get("vq_config") is not None or kind != "vq":
        return {"kind": kind, "vq_config": args.get("vq_config"), "seed": args.get("seed", 0)}
    return {"kind": "vq", "repo": VQ_REPO, "file": VQ_FILENAME}


def _model_card(config: dict[str, Any], measured: dict[str, Any] | None, ref: str) -> str:
    """README.md: the model, its scores (a ``main_eval.py`` metrics.json), its sampling settings,
    its use (``ref``: its Hub repository or folder; ImageNet only for 1000-class models)."""
    from lpd.sampling import SamplingConfig

    c, train, args = config["model_config"], config["training"], config["training"]["args"]
    if measured:
        sampling, steps = (
            measured.get("sampling", {}),
            len(measured.get("settings", {}).get("group_sizes", [])) or None,
        )
    else:
        sampling, steps = (
            {k: args[k] for k in SamplingConfig.__dataclass_fields__ if k in args},
            args.get("eval_steps"),
        )
    run = (
        f"--pretrained_ckpt {ref} --generation_steps {steps or 20} --cfg {sampling.get('cfg', 4.0)}"
    )
    imagenet = c["class_num"] == 1000
    labels = [207, 360, 387, 974] if imagenet else list(range(min(4, c["class_num"])))
    return "\n".join(
        [
            "---",
            "library_name: lpd",
            "tags: [lpd, image-generation, class-conditional, autoregressive]",
            "---",
            "",
            f"# {config.get('model') or 'LPD'} at {c['img_size']} px",
            "",
            f"A class-conditional Locality-aware Parallel Decoding (LPD) image generator: {config['parameters'] / 1e6:.1f}M parameters "
            f"(width {c['embed_dim']}, depth {c['depth']}, {c['num_heads']} heads), {c['class_num']} classes, tokens of a "
            f"{c['vocab_size']}-entry VQ codebook ({json.dumps(config['tokenizer'])}). Weights: {config['weights']} after epoch "
            f"{train.get('epoch')} (global step {train.get('global_step')}), sha256 {config['weights_sha256'][:16]}...",
            "",
            *(
                [
                    "## Metrics",
                    "",
                    "| FID | IS | images | steps |",
                    "| ---: | ---: | ---: | ---: |",
                    f"| {measured.get('fid')} | {measured.get('inception_score')} | {measured.get('num_images')} | {steps} |",
                    "",
                ]
                if measured
                else []
            ),
            f"## Sampling settings{'' if measured else ' (of the evaluation during training)'}",
            "",
            *(f"* {k}: {v}" for k, v in [("steps", steps), *sampling.items()]),
            "",
            "## Use",
            "",
            "```python",
            "from lpd.pipeline import LPDPipeline",
            "",
            f'pipe = LPDPipeline.from_pretrained("{ref}")   # or lpd.models.load_lpd("{ref}"): the LPD module',
            f"images = pipe({labels}, steps={steps or 20}, cfg={sampling.get('cfg', 4.0)})"
            f"   # uint8 [{len(labels)}, H, W, 3]",
            "```",
            "",
            *(
                [f"Evaluation on ImageNet: `python main_eval.py {run} --output_dir out/`.", ""]
                if imagenet
                else []
            ),
        ]
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
    """Write the weights of ``ckpt`` (file or sharded folder) as the folder ``out_dir`` (weights, config, a model
    card with the scores of a ``main_eval.py`` ``metrics.json``; ``sampling``: the default sampling settings
    recorded in the config); the folder appears whole. Returns its path."""
    from safetensors.torch import save

    from lpd.models import LPD, checkpoint_config

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
    load_into(
        net,
        sd,
        source=f"{ckpt!r}",
        hint="pass --model with the architecture it was trained as",
        assign=True,
    )
    digest = state_dict_digest(sd)
    measured = None
    if metrics:
        with open(metrics, encoding="utf-8") as f:
            measured = json.load(f)
        scored = (measured.get("settings") or {}).get("weights_sha256")
        if scored not in (None, digest):
            raise CheckpointError(
                f"--metrics {metrics}: these scores were measured on other weights (sha256 {scored[:12]}... "
                f"vs {digest[:12]}...); give the metrics.json of a main_eval.py run of this checkpoint"
                + ("" if use_ema else " (or add --use_ema)")
            )
    args = state.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
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
    """Whether ``out_dir`` exists (empty, or an earlier export replaced with ``overwrite``); anything else is
    refused: a folder holding the source or other files is never written into."""
    src, out = os.path.realpath(ckpt), os.path.realpath(out_dir)
    if os.path.commonpath([src, out]) in (src, out):
        raise CheckpointError(
            f"OUT_DIR {out_dir} holds the checkpoint {ckpt} (or lies inside it); export into a "
            f"new folder"
        )
    if not os.path.lexists(out_dir):
        return False
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"OUT_DIR {out_dir} is a file; give a new folder")
    names = {
        n for n in os.listdir(out_dir) if not n.startswith(TMP_PREFIX)
    }  # temporary files of a killed export
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
    """Upload an exported folder to the Hub model repository ``repo`` in one commit; returns its URL."""
    import huggingface_hub

    from lpd import hub

    try:
        huggingface_hub.create_repo(repo, exist_ok=True, private=private)
        huggingface_hub.upload_folder(repo_id=repo, folder_path=folder, commit_message="lpd export")
    except Exception as e:  # noqa: BLE001 - network, authentication, permissions: reported with the cause
        raise CheckpointError(
            f"--push_to_hub {repo}: the upload failed ({hub.cause(e)}); nothing was committed. The export "
            f"{folder} is complete: upload it later with `hf upload {repo} {folder}`"
        ) from e
    return f"https://huggingface.co/{repo}"


def main(argv: Sequence[str] | None = None) -> int:
    """``consolidate`` and ``export``; errors print one ``error:`` line and return 2."""
    p = argparse.ArgumentParser(
        prog="python -m lpd.checkpoint",
        allow_abbrev=False,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "consolidate", help="a sharded (--fsdp) checkpoint as one .pth file of the released format"
    )
    c.add_argument(
        "run_dir", help="an --fsdp run's output folder (its checkpoint-last) or a checkpoint folder"
    )
    c.add_argument("out", help="the .pth file to write")
    e = sub.add_parser(
        "export", help="model.safetensors + config.json + README.md, optionally uploaded to the Hub"
    )
    e.add_argument("ckpt", help="a checkpoint file (.pth) or sharded checkpoint folder")
    e.add_argument("out_dir", help="the folder to write")
    e.add_argument(
        "--model",
        default=None,
        help="preset of a released checkpoint that does not record its architecture",
    )
    e.add_argument(
        "--use_ema",
        action="store_true",
        help="export the EMA weights (runs trained with --ema_decay)",
    )
    e.add_argument(
        "--metrics",
        default=None,
        help="a main_eval.py metrics.json of these weights, shown in the model card",
    )
    e.add_argument(
        "--push_to_hub",
        default=None,
        metavar="REPO",
        help="upload the folder to this Hub model repository",
    )
    e.add_argument(
        "--private", action="store_true", help="with --push_to_hub: create the repository private"
    )
    for q in (c, e):
        q.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    try:
        if args.command == "consolidate":
            from lpd.parallel import last_checkpoint

            problem = check_output_path(args.out, "OUT", overwrite=True) or (
                f"OUT {args.out} exists; --overwrite replaces it"
                if os.path.exists(args.out) and not args.overwrite
                else None
            )
            if problem:
                raise CheckpointError(problem)
            state = load_checkpoint(last_checkpoint(args.run_dir, sharded=True) or args.run_dir)
            state.pop("sharded", None)
            save_checkpoint(state, args.out)
            print(
                f"wrote {args.out} (epoch {state.get('epoch')}, step {state.get('step')}, "
                f"{'model and model_ema' if 'model_ema' in state else 'model'})"
            )
            return 0
        if args.push_to_hub:
            from lpd import hub

            if hub.offline():
                raise CheckpointError(
                    "--push_to_hub needs the network, but HF_HUB_OFFLINE is set; export without it "
                    "and upload the folder later with `hf upload REPO OUT_DIR`"
                )
        out = export(
            args.ckpt,
            args.out_dir,
            model=args.model,
            use_ema=args.use_ema,
            metrics=args.metrics,
            repo=args.push_to_hub,
            overwrite=args.overwrite,
        )
        print(f"wrote {out}: {EXPORT_WEIGHTS}, {EXPORT_CONFIG}, {EXPORT_CARD}")
        if args.push_to_hub:
            print(f"uploaded to {push_to_hub(out, args.push_to_hub, args.private)}")
    except (CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # lpd.checkpoint's main(), not __main__'s: it catches the classes lpd.parallel raises
    from lpd.checkpoint import main as module_main

    sys.exit(module_main())
