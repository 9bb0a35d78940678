"""Deterministic, sharded, resumable sampling of an evaluation set, and its scores (FID, IS, speed).

This is the library behind ``main_eval.py``; the training loop and the CPU demo call it in-process
with a model and a tokenizer they already hold::

    from lpd.evaluate import generate_images, evaluate
    out = generate_images(model, tokenizer, num_images=1000, group_sizes=sizes, order="lpd",
                          repulsion_threshold=2.0, cfg=4.8, seed=0, eval_bsz=64)
    out.images                       # uint8 [1000, H, W, 3] (no output folder: kept in memory)
    result = evaluate(model, tokenizer, num_images=1000, group_sizes=sizes, cfg=4.8,
                      feature_extractor=my_extractor, ref_stats="ref_stats.npz")

**What image ``i`` is.** Image ``i`` (``0 <= i < num_images``) depends only on ``(seed, i)`` and
the settings, never on the number of processes or on which images were already on disk:

* its class is ``floor(i * class_num / num_images)`` (:func:`image_classes`): ``i // 50`` for the
  paper's 50,000 images and 1,000 classes (labels ``0..999`` each repeated 50 times); for other
  counts every class gets ``floor`` or ``ceil`` of ``num_images / class_num`` consecutive images,
  and with fewer images than classes the classes are spread evenly (20 images of 1,000 classes:
  0, 50, 100, ...).  ``labels=`` replaces the rule with explicit classes;
* its order is order ``i`` of the run: generated from ``(seed, i)`` by :mod:`lpd.orders`, or row
  ``i`` of an order table (``--lpd_order_file``);
* its sampling noise comes from its own ``torch.Generator`` (on the CPU, whatever the device)
  seeded with :func:`image_seed` ``(seed, i)``.

**Batches.** The images are cut into a fixed plan of batches ``[j * B, (j + 1) * B)`` (``B`` =
``eval_bsz``); the last one is padded to ``B`` rows by repeating its own entries (the extra rows
are dropped).  Batch ``j`` belongs to rank ``j % world_size``.  Every image is thus always decoded
in the same batch, at the same row, with the same batch size, so 1 process or N processes (gloo on
the CPU, nccl on GPUs) write byte-identical PNGs as long as the kernels are the same: same device
type and ``eval_bsz`` and, on the CPU, the same number of threads per process (oneDNN convolutions
round differently with 1 and 2 threads; ``torchrun`` gives every process ``OMP_NUM_THREADS=1``, so
run the single process with ``OMP_NUM_THREADS=1`` too to compare them).

**Resuming.** A batch is skipped when all its PNGs exist and decode to images of the right size;
otherwise it is decoded again and its missing or unreadable PNGs are written.  Every file is
written to a temporary name in the same folder and renamed (``os.replace``), so an interrupted run
never leaves a partial file behind.  ``settings.json`` in the run folder records the settings that
determine the pixels; a rerun with different settings is refused instead of mixing two runs.  (A
rerun with another ``eval_bsz`` or process count is allowed: its images follow the same
distribution, but are only guaranteed to be the same bytes with the same kernels, see above.)

**Outputs** of :func:`evaluate` in a run folder: ``images/000000.png ...``, ``<run>.npz`` (ADM
format: ``arr_0``, uint8 ``N x H x W x 3``, written by rank 0 after a barrier, streamed so the 50k
images never sit in memory at once), ``samples_grid.png`` (the first 64 images) and
``metrics.json`` (FID, IS, every setting, image count, speed, device, dtype, library versions).

**Speed** is measured as the paper does: wall time of each batch after the first one (warm-up)
with device synchronisation, for the tokens alone and for tokens plus VQ decoding; reported per
process (seconds per batch and per image, images per second) and summed over processes.  Making
the orders and writing the PNGs fall outside the timed region (the released code reads its orders
from files).

**Metrics** go through :mod:`lpd.metrics` (upstream torch-fidelity's ``inception-v3-compat`` for
FID/IS); any feature extractor with the same call signature can be plugged in (the CPU demo plugs
in its digit classifier): ``extractor(images uint8 [B, 3, H, W]) -> (features [B, D], logits
[B, C] or None)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from lpd.checkpoint import TMP_PREFIX, atomic_write_bytes
from lpd.distributed import barrier, broadcast_object
from lpd.sampling import check_sampling_args, sample_tokens, warn_if_emulated_bf16
from lpd.schedules import validate_group_sizes

__all__ = [
    "EvaluationError",
    "ORDER_CHOICES",
    "FeatureExtractor",
    "image_classes",
    "image_seed",
    "batch_plan",
    "OrderSource",
    "load_order_table",
    "SpeedMeter",
    "sample_batch",
    "GenerationResult",
    "generate_images",
    "evaluate",
    "run_name",
    "pixel_settings",
    "prepare_run_dir",
    "image_path",
    "read_png",
    "write_png",
    "write_npz",
    "save_grid",
    "to_uint8",
    "synchronize",
    "device_description",
    "library_versions",
    "rank0_first",
    "load_model",
    "load_tokenizer",
]

#: Generation orders :func:`generate_images` understands.
ORDER_CHOICES = ("lpd", "random", "raster")

#: A feature extractor for the metrics: uint8 images ``[B, 3, H, W]`` -> (features, logits or None).
FeatureExtractor = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]

SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.json"
GRID_FILE = "samples_grid.png"
IMAGES_DIR = "images"


class EvaluationError(ValueError):
    """Settings or files that do not allow an evaluation run (raised before any image is sampled)."""


# ---------------------------------------------------------------------------------------------
# What image i is: class, seed, order
# ---------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise EvaluationError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def image_classes(indices: Sequence[int] | np.ndarray, num_images: int, class_num: int) -> np.ndarray:
    """Class of each image index: ``floor(i * class_num / num_images)`` (int64).

    With ``num_images`` a multiple of ``class_num`` this is ``i // (num_images / class_num)``: the
    paper's 50,000 images of 1,000 classes are labels ``0..999`` each repeated 50 times.  Other
    counts give every class ``floor`` or ``ceil`` of ``num_images / class_num`` consecutive images;
    fewer images than classes spread the classes evenly (20 of 1,000: 0, 50, 100, ..., 950).
    """
    num_images = _check_positive_int("num_images", num_images)
    class_num = _check_positive_int("class_num", class_num)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= num_images):
        raise EvaluationError(f"image indices must lie in 0..{num_images - 1}")
    return (idx * class_num) // num_images


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s sampling generator: a 63-bit hash of ``(seed, index)``."""
    digest = hashlib.blake2b(f"lpd-eval-image:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def batch_plan(num_images: int, eval_bsz: int) -> list[np.ndarray]:
    """The fixed batches ``[j*B, (j+1)*B)`` of a run (the last one may be short; it is padded at run time)."""
    num_images = _check_positive_int("num_images", num_images)
    eval_bsz = _check_positive_int("eval_bsz", eval_bsz)
    return [np.arange(s, min(s + eval_bsz, num_images), dtype=np.int64) for s in range(0, num_images, eval_bsz)]


def _contiguous_runs(indices: np.ndarray) -> Iterator[tuple[int, int]]:
    """(start, length) of the runs of consecutive integers in ``indices`` (in the given order)."""
    if indices.size == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    for part in np.split(indices, breaks):
        yield int(part[0]), int(part.size)


def load_order_table(path: str | os.PathLike, num: int, grid_size: int) -> np.ndarray:
    """Rows ``0..num-1`` of an order file (JSON list of raster-index lists), validated by
    :func:`lpd.orders.load_orders` (every row a permutation of ``0..N-1``, at least ``num`` rows)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise EvaluationError(
            f"order file {path!r} (--lpd_order_file) does not exist; generate one with "
            f"'python -m lpd.orders ...', or leave the flag out to generate orders from --seed"
        )
    try:
        from lpd.orders import load_orders
    except ImportError:  # older layout: the loader lives in lpd.orders.files only
        from lpd.orders.files import load_orders
    try:
        table = np.asarray(load_orders(path, num, grid_size), dtype=np.int64)
    except (ValueError, OSError) as e:
        raise EvaluationError(f"order file {path!r} (--lpd_order_file) cannot be used: {e}") from e
    if table.ndim != 2 or table.shape[0] < num or table.shape[1] != grid_size * grid_size:
        raise EvaluationError(
            f"order file {path!r} holds {list(table.shape)} orders; need at least {num} rows of "
            f"{grid_size * grid_size} positions"
        )
    return table[:num]


class OrderSource:
    """Order ``i`` of a run: generated from ``(seed, i)`` (``lpd``, ``random``), the raster order,
    or row ``i`` of a given table (e.g. from ``--lpd_order_file``)."""

    def __init__(
        self,
        kind: str,
        group_sizes: Sequence[int],
        grid_size: int,
        *,
        seed: int = 0,
        proximity_threshold: float = 1.0,
        repulsion_threshold: float = 1.0,
        table: np.ndarray | None = None,
    ) -> None:
        if kind not in ORDER_CHOICES:
            raise EvaluationError(f"order must be one of {list(ORDER_CHOICES)}, got {kind!r}")
        self.kind = kind
        self.group_sizes = validate_group_sizes(group_sizes, grid_size * grid_size)
        self.grid_size = int(grid_size)
        self.seed = int(seed)
        self.proximity_threshold = float(proximity_threshold)
        self.repulsion_threshold = float(repulsion_threshold)
        if table is not None:
            table = np.asarray(table, dtype=np.int64)
            n = self.grid_size ** 2
            if table.ndim != 2 or table.shape[1] != n:
                raise EvaluationError(f"order table must have shape [num, {n}], got {list(table.shape)}")
            if not np.array_equal(np.sort(table, axis=1), np.broadcast_to(np.arange(n), table.shape)):
                bad = int(np.flatnonzero((np.sort(table, axis=1) != np.arange(n)).any(axis=1))[0])
                raise EvaluationError(f"order table row {bad} is not a permutation of 0..{n - 1}")
        self.table = table

    def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Orders of the given image indices, int64 ``[len(indices), N]``."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.table is not None:
            if idx.size and idx.max() >= len(self.table):
                raise EvaluationError(f"the order table has {len(self.table)} rows; image {int(idx.max())} needs more")
            return self.table[idx]
        from lpd.orders import lpd_orders, random_orders, raster_orders

        if self.kind == "raster":
            return raster_orders(idx.size, self.grid_size)
        out = np.empty((idx.size, self.grid_size ** 2), dtype=np.int64)
        pos = 0
        for start, length in _contiguous_runs(idx):
            if self.kind == "lpd":
                rows = lpd_orders(length, self.group_sizes, self.grid_size, self.proximity_threshold,
                                  self.repulsion_threshold, seed=self.seed, start=start)
            else:
                rows = random_orders(length, self.grid_size, seed=self.seed, start=start)
            out[pos : pos + length] = rows
            pos += length
        return out


# ---------------------------------------------------------------------------------------------
# Devices, timing, versions
# ---------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA, MPS, XPU); a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.synchronize()
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.synchronize(device)


def device_description(device: torch.device | str) -> str:
    """A human-readable name of the device, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu (x86_64, 2 threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine() or "unknown"
    if device.type == "cpu":
        return f"cpu ({name}, {torch.get_num_threads()} threads)"
    return f"{device.type} ({name})"


def library_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries that shape the numbers."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("lpd", "numpy", "pillow", "torch-fidelity", "torchvision", "scipy", "huggingface_hub"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    out["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
    return out


def _rate(seconds: float | None, per: int) -> dict[str, float | None]:
    if seconds is None or seconds <= 0:
        return {"s_per_batch": None, "s_per_image": None, "images_per_s": None}
    return {"s_per_batch": seconds, "s_per_image": seconds / per, "images_per_s": per / seconds}


@dataclass
class SpeedMeter:
    """Per-batch wall times after the first (warm-up) batch, for tokens and for tokens + VQ decoding."""

    batch_size: int
    token_times: list[float] = field(default_factory=list)
    total_times: list[float] = field(default_factory=list)
    warmup_done: bool = False

    def add(self, token_seconds: float, total_seconds: float) -> None:
        """Record one batch; the first one recorded is the warm-up and is dropped."""
        if not self.warmup_done:
            self.warmup_done = True
            return
        self.token_times.append(token_seconds)
        self.total_times.append(total_seconds)

    def summary(self, world_size: int = 1) -> dict[str, Any]:
        """Speed of this process and, gathered over the process group, of all of them.

        Must be called on every rank when a process group is active (it gathers).
        """
        local = (list(self.token_times), list(self.total_times))
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        tok_all = [t for g in gathered for t in g[0]]
        tot_all = [t for g in gathered for t in g[1]]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        per_rank_tot = [mean(g[1]) for g in gathered]
        per_rank_tok = [mean(g[0]) for g in gathered]
        out: dict[str, Any] = {
            "eval_bsz": self.batch_size,
            "processes": len(gathered),
            "timed_batches": len(tot_all),
            "note": "wall time per batch after each process's first (warm-up) batch, with device synchronisation",
            # One process (one device): mean over every timed batch of every process.
            "tokens": _rate(mean(tok_all), self.batch_size),
            "tokens_and_decode": _rate(mean(tot_all), self.batch_size),
        }
        if all(t is not None for t in per_rank_tot) and gathered:
            out["total_images_per_s"] = {
                "tokens": float(sum(self.batch_size / t for t in per_rank_tok)),
                "tokens_and_decode": float(sum(self.batch_size / t for t in per_rank_tot)),
            }
        else:
            out["total_images_per_s"] = None
        if not tot_all:
            out["note"] += "; no timed batch (each process needs at least 2 batches to sample)"
        return out


# ---------------------------------------------------------------------------------------------
# Files: PNGs, npz, grid
# ---------------------------------------------------------------------------------------------


def image_path(image_dir: str | os.PathLike, index: int) -> str:
    """``image_dir/000123.png`` (six digits, more when needed)."""
    return os.path.join(os.fspath(image_dir), f"{int(index):06d}.png")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` image as PNG atomically."""
    arr = np.ascontiguousarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {arr.dtype} {list(arr.shape)}")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    # no fsync for the many small PNGs: one damaged by a power loss fails the next run's check and is redone
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()), fsync=False)


def read_png(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """The uint8 ``[H, W, 3]`` pixels of a PNG, or ``None`` when it is missing, unreadable, not RGB
    or not ``size`` (height, width)."""
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format != "PNG" or im.mode != "RGB":
                return None
            arr = np.asarray(im.convert("RGB"))  # decodes every pixel: truncated files fail here
    except (OSError, ValueError, SyntaxError):
        return None
    if arr.ndim != 3 or arr.shape[2] != 3 or (size is not None and tuple(arr.shape[:2]) != tuple(size)):
        return None
    return arr


def write_npz(path: str | os.PathLike, image_paths: Sequence[str], size: tuple[int, int]) -> None:
    """Pack PNGs into an ADM-format ``.npz`` (``arr_0``, uint8 ``[N, H, W, 3]``), atomically.

    The array is streamed into the (uncompressed, zip64) archive one image at a time, so memory
    stays at one image whatever ``N``; ``np.load(path)["arr_0"]`` reads it back.
    """
    h, w = int(size[0]), int(size[1])
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(image_paths), h, w, 3)}

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for p in image_paths:
                    arr = read_png(p, (h, w))
                    if arr is None:
                        raise EvaluationError(f"cannot pack {p!r} into {os.fspath(path)!r}: missing or unreadable PNG")
                    out.write(np.ascontiguousarray(arr).tobytes())

    atomic_write_bytes(path, write)


def save_grid(path: str | os.PathLike, images: Sequence[np.ndarray], ncol: int = 8, max_tile: int = 256) -> None:
    """Write a grid of uint8 ``[H, W, 3]`` images (tiles shrunk to at most ``max_tile`` pixels), atomically."""
    if len(images) == 0:
        raise ValueError("save_grid needs at least one image")
    h, w = images[0].shape[:2]
    scale = min(1.0, max_tile / max(h, w))
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    ncol = min(ncol, len(images))
    nrow = math.ceil(len(images) / ncol)
    canvas = Image.new("RGB", (ncol * tw, nrow * th), (255, 255, 255))
    for k, arr in enumerate(images):
        tile = Image.fromarray(np.ascontiguousarray(arr), "RGB")
        if (th, tw) != (h, w):
            tile = tile.resize((tw, th), Image.BICUBIC)
        canvas.paste(tile, ((k % ncol) * tw, (k // ncol) * th))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, lambda f: f.write(buf.getvalue()))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output ``[B, 3, H, W]`` in ``[-1, 1]`` -> uint8 ``[B, H, W, 3]`` (NumPy, on the CPU):
    ``round(clip((x + 1) / 2 * 255, 0, 255))`` as the released sampling code."""
    x = ((images.float() + 1.0) * 127.5).clamp_(0.0, 255.0).round_().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Run folders and settings
# ---------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    v = float(value)
    return f"{v:.1f}" if v.is_integer() else f"{v:g}"


def pixel_settings(
    *,
    model: str,
    img_size: int,
    num_images: int,
    group_sizes: Sequence[int],
    order: str,
    seed: int,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
    order_file: str | None = None,
    bf16: bool = False,
    weights: str = "",
    tokenizer: str = "",
    labels: str = "rule",
) -> dict[str, Any]:
    """The settings that determine the pixels of a run (what ``settings.json`` records and a rerun
    must match).  ``weights``/``tokenizer`` identify the checkpoint and tokenizer (file names, or
    ``random_init seed S``).  Batch size, device and process count are deliberately not included."""
    out: dict[str, Any] = {
        "model": model,
        "weights": weights,
        "tokenizer": tokenizer,
        "img_size": int(img_size),
        "num_images": int(num_images),
        "labels": labels,
        "group_sizes": [int(g) for g in group_sizes],
        "order": order,
        "order_file": os.path.basename(order_file) if order_file else None,
        "seed": int(seed),
        "cfg": float(cfg),
        "cfg_schedule": cfg_schedule,
        "temperature": float(temperature),
        "top_k": int(top_k),
        "top_p": float(top_p),
        "bf16": bool(bf16),
    }
    if order == "lpd" and not order_file:
        out["proximity_threshold"] = float(proximity_threshold)
        out["repulsion_threshold"] = float(repulsion_threshold)
    return out


def run_name(settings: Mapping[str, Any]) -> str:
    """Folder name of a run, e.g. ``lpd_l-res256-steps20-cfg4.8-lpd-tr2.0-seed0``.

    Non-default settings are appended (``-cfgconst``, ``-temp0.9``, ``-topk100``, ``-topp0.9``,
    ``-bf16``, ``-n10000`` when not 50,000 images, ``-tp1.5``, ``-file<name>`` for an order file,
    ``-gs<hash>`` for group sizes given explicitly)."""
    s = settings
    parts = [str(s["model"]), f"res{s['img_size']}", f"steps{len(s['group_sizes'])}", f"cfg{_fmt(s['cfg'])}"]
    if s.get("cfg_schedule", "linear") != "linear":
        parts.append("cfgconst")
    parts.append(str(s["order"]))
    if s.get("order_file"):
        parts.append("file" + os.path.splitext(str(s["order_file"]))[0])
    elif s["order"] == "lpd":
        parts.append(f"tr{_fmt(s.get('repulsion_threshold', 1.0))}")
        if float(s.get("proximity_threshold", 1.0)) != 1.0:
            parts.append(f"tp{_fmt(s['proximity_threshold'])}")
    if s.get("custom_group_sizes"):
        digest = hashlib.blake2b(json.dumps(list(s["group_sizes"])).encode(), digest_size=3).hexdigest()
        parts.append(f"gs{digest}")
    if float(s.get("temperature", 1.0)) != 1.0:
        parts.append(f"temp{_fmt(s['temperature'])}")
    if int(s.get("top_k", 0)):
        parts.append(f"topk{int(s['top_k'])}")
    if float(s.get("top_p", 1.0)) != 1.0:
        parts.append(f"topp{_fmt(s['top_p'])}")
    if s.get("bf16"):
        parts.append("bf16")
    if str(s.get("weights", "")).startswith("random_init"):
        parts.append("randinit")
    if int(s["num_images"]) != 50000:
        parts.append(f"n{int(s['num_images'])}")
    parts.append(f"seed{int(s['seed'])}")
    name = "-".join(parts)
    return "".join(c if (c.isalnum() or c in "-_.") else "_" for c in name)


def _settings_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def prepare_run_dir(run_dir: str | os.PathLike, settings: Mapping[str, Any], rank: int = 0) -> str:
    """Create ``run_dir/images``, record ``settings.json`` (rank 0), refuse a folder made with other
    settings, and remove temporary files a killed run left.  Every rank must call it (it synchronises)."""
    run_dir = os.fspath(run_dir)
    error = None
    if rank == 0:
        try:
            os.makedirs(os.path.join(run_dir, IMAGES_DIR), exist_ok=True)
            path = os.path.join(run_dir, SETTINGS_FILE)
            settings = json.loads(json.dumps(dict(settings)))  # normalise tuples etc.
            if os.path.isfile(path):
                with open(path, "r", encoding="utf-8") as f:
                    old = json.load(f)
                diff = _settings_diff(old, settings)
                if diff:
                    raise EvaluationError(
                        f"run folder {run_dir!r} holds images sampled with other settings:\n  "
                        + "\n  ".join(diff)
                        + "\nUse another --output_dir, or delete the folder to start over."
                    )
            else:
                data = json.dumps(settings, indent=2, sort_keys=True).encode()
                atomic_write_bytes(path, lambda f: f.write(data))
            image_dir = os.path.join(run_dir, IMAGES_DIR)
            for name in os.listdir(image_dir):
                if name.startswith(TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(image_dir, name))
        except (EvaluationError, OSError, json.JSONDecodeError) as e:
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error)
    if error is not None:
        raise EvaluationError(error)
    barrier()
    return run_dir


def rank0_first(fn: Callable[[], Any], rank: int, world_size: int) -> Any:
    """Run ``fn`` on rank 0 first (e.g. a download into a shared cache), then on the other ranks.

    An exception on rank 0 is raised there unchanged and, as an :class:`EvaluationError` naming it,
    on every other rank, so that no process waits forever.
    """
    if world_size <= 1:
        return fn()
    error, result, exc = None, None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error, exc = f"{type(e).__name__}: {e}", e
    error = broadcast_object(error)
    if error is not None:
        if exc is not None:
            raise exc
        raise EvaluationError(f"rank 0 failed during set-up: {error}")
    if rank != 0:
        result = fn()
    barrier()
    return result


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """What :func:`generate_images` did on this rank.

    ``images``: uint8 ``[num_images, H, W, 3]`` of the whole run when no output folder was given
    (gathered on every rank), else ``None``; ``image_paths``: the ``num_images`` PNG paths when an
    output folder was given; ``generated`` / ``skipped``: images sampled / found on disk, summed
    over the processes.
    """

    num_images: int
    image_size: tuple[int, int]
    images: np.ndarray | None
    image_paths: list[str] | None
    generated: int
    skipped: int
    speed: dict[str, Any]


def _autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    warn_if_emulated_bf16(device, torch.bfloat16)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    indices: np.ndarray,
    labels: np.ndarray,
    orders: np.ndarray,
    group_sizes: Sequence[int],
    *,
    seed: int,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    bf16: bool = False,
) -> tuple[np.ndarray, float, float]:
    """Sample one batch: returns (uint8 ``[B, H, W, 3]``, token seconds, token + decode seconds).

    Row ``r`` uses the generator of image ``indices[r]`` (:func:`image_seed`); tokens are sampled
    under bf16 autocast when asked, and decoded by the tokenizer in its own precision.
    """
    device = model.pos_embed.device
    gens = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=device)
    orders_t = torch.as_tensor(orders, dtype=torch.long, device=device)
    synchronize(device)
    t0 = time.perf_counter()
    with _autocast(device, bf16):
        tokens = sample_tokens(model, labels_t, orders_t, group_sizes, cfg=cfg, cfg_schedule=cfg_schedule,
                               temperature=temperature, top_k=top_k, top_p=top_p, generator=gens)
    synchronize(device)
    t1 = time.perf_counter()
    g = int(round(math.sqrt(tokens.shape[1])))
    decoded = tokenizer.decode(tokens.view(tokens.shape[0], g, g))
    pixels = to_uint8(decoded)  # copies to the host, hence synchronises
    synchronize(device)
    t2 = time.perf_counter()
    return pixels, t1 - t0, t2 - t0


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The LPD inside a ``DistributedDataParallel`` (or similar ``.module``) wrapper."""
    while not hasattr(model, "pos_embed") and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if not (0 <= rank < world_size):
        raise EvaluationError(f"rank {rank} is outside 0..{world_size - 1}")
    return int(rank), int(world_size)


def generate_images(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    num_images: int,
    group_sizes: Sequence[int],
    *,
    order: str = "lpd",
    orders: np.ndarray | OrderSource | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    proximity_threshold: float = 1.0,
    repulsion_threshold: float = 1.0,
    cfg: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eval_bsz: int = 64,
    bf16: bool = False,
    output_dir: str | os.PathLike | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
) -> GenerationResult:
    """Sample ``num_images`` images; image ``i`` depends only on ``(seed, i)`` and the settings.

    Parameters
    ----------
    model, tokenizer
        An LPD model (on its device; a ``DistributedDataParallel`` wrapper is looked through) and
        a tokenizer with ``decode(tokens [B, h, w])``.
    num_images, group_sizes
        How many images, and the decoding schedule (``len(group_sizes)`` steps, summing to N).
    order, orders
        ``"lpd"`` / ``"random"`` / ``"raster"`` orders generated from ``(seed, i)``, or an explicit
        order table ``[>= num_images, N]`` (row ``i`` for image ``i``) or :class:`OrderSource`.
    labels
        Class of every image (``[num_images]``); default :func:`image_classes`.
    cfg, cfg_schedule, temperature, top_k, top_p, bf16
        Sampling settings (:func:`lpd.sampling.sample_tokens`; bf16 autocast for the transformer).
    seed, eval_bsz
        Seed of the run; rows per forward pass (every pass has exactly ``eval_bsz`` rows).
    output_dir
        Folder for ``000000.png ...``; existing readable PNGs are kept (resume).  ``None``: the
        images are returned in memory (gathered over the process group).
    rank, world_size
        This process's shard (default: from ``torch.distributed``, or a single process).
    progress
        Show a tqdm bar on rank 0.
    """
    rank, world_size = _world(rank, world_size)
    model = _unwrap(model)
    num_images = _check_positive_int("num_images", num_images)
    eval_bsz = _check_positive_int("eval_bsz", eval_bsz)
    check_sampling_args(cfg, cfg_schedule, temperature, top_k, top_p)
    N = int(model.num_tokens)
    grid = int(model.grid_size)
    sizes = validate_group_sizes(group_sizes, N)
    if isinstance(orders, OrderSource):
        source = orders
    else:
        source = OrderSource(order, sizes, grid, seed=seed, proximity_threshold=proximity_threshold,
                             repulsion_threshold=repulsion_threshold, table=orders)
        if orders is not None and len(source.table) < num_images:
            raise EvaluationError(f"the order table has {len(source.table)} rows for {num_images} images")
    if labels is None:
        all_labels = image_classes(np.arange(num_images), num_images, int(model.class_num))
    else:
        all_labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if all_labels.shape != (num_images,):
            raise EvaluationError(f"labels must hold one class per image ({num_images}), got {all_labels.size}")
        if all_labels.min() < 0 or all_labels.max() >= int(model.class_num):
            raise EvaluationError(f"labels must lie in 0..{int(model.class_num) - 1}")

    if output_dir is None and world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise EvaluationError(
            f"a run over {world_size} processes without output_dir gathers the images through "
            f"torch.distributed; initialise the process group first (or give an output_dir)")
    factor = int(getattr(tokenizer, "downsample_factor", 16))
    size = (grid * factor, grid * factor)
    image_dir = None
    if output_dir is not None:
        image_dir = os.fspath(output_dir)
        os.makedirs(image_dir, exist_ok=True)

    meter = SpeedMeter(eval_bsz)
    plan = batch_plan(num_images, eval_bsz)
    mine = [b for j, b in enumerate(plan) if j % world_size == rank]
    kept: dict[int, np.ndarray] = {}
    generated = skipped = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc="sampling", unit="img", dynamic_ncols=True)
    for batch in mine:
        todo = batch
        if image_dir is not None:
            todo = np.array([i for i in batch if read_png(image_path(image_dir, i), size) is None], dtype=np.int64)
            skipped += batch.size - todo.size
        if todo.size:
            rows = np.resize(batch, eval_bsz)  # pad by repeating the batch's own entries
            pixels, t_tok, t_all = sample_batch(
                model, tokenizer, rows, all_labels[rows], source.rows(rows), sizes, seed=seed, cfg=cfg,
                cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p, bf16=bf16)
            meter.add(t_tok, t_all)
            if tuple(pixels.shape[1:3]) != size:
                raise EvaluationError(
                    f"the tokenizer decoded {list(pixels.shape[1:3])} images, expected {list(size)} for a "
                    f"{grid}x{grid} token grid (downsample factor {factor})")
            wanted = set(int(i) for i in todo)
            for r, i in enumerate(batch):  # the first batch.size rows are the real ones
                if image_dir is None:
                    kept[int(i)] = pixels[r]
                elif int(i) in wanted:
                    write_png(image_path(image_dir, int(i)), pixels[r])
            generated += todo.size
        if bar is not None:
            bar.update(min(batch.size * world_size, bar.total - bar.n))  # rank 0 stands for all
    if bar is not None:
        bar.close()

    speed = meter.summary(world_size)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        counts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(counts, (generated, skipped))
        generated, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
    images = None
    paths = None
    if image_dir is not None:
        barrier()
        paths = [image_path(image_dir, i) for i in range(num_images)]
    else:
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, kept)
            for p in parts:
                kept.update(p)
        images = np.stack([kept[i] for i in range(num_images)])
    return GenerationResult(num_images=num_images, image_size=size, images=images, image_paths=paths,
                            generated=generated, skipped=skipped, speed=speed)


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------


def _on_rank0(fn: Callable[[], Any], rank: int, what: str) -> Any:
    """Run ``fn`` on rank 0 only; its exception is raised there and reported on every other rank."""
    result, exc = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            exc = e
    msg = broadcast_object(None if exc is None else f"{type(exc).__name__}: {exc}")
    if exc is not None:
        raise exc
    if msg is not None:
        raise EvaluationError(f"rank 0 failed {what}: {msg}")
    return result


def evaluate(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    num_images: int,
    group_sizes: Sequence[int],
    *,
    output_dir: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    compute_fid: bool = True,
    ref_stats: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
    feature_extractor: FeatureExtractor | None = None,
    inception_weights: str | os.PathLike | None = None,
    metrics_batch_size: int = 50,
    info: Mapping[str, Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = False,
    grid_images: int = 64,
    **sampling: Any,
) -> dict[str, Any]:
    """Sample (:func:`generate_images`), pack, score and record one evaluation run.

    Parameters
    ----------
    model, tokenizer, num_images, group_sizes
        As :func:`generate_images`; ``sampling`` holds its other keyword arguments (``order``,
        ``orders``, ``cfg``, ``cfg_schedule``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``eval_bsz``, ``bf16``, thresholds, ``labels``).
    output_dir
        The run folder: ``images/*.png``, ``<folder name>.npz`` (ADM), ``samples_grid.png``,
        ``metrics.json``; ``settings`` (:func:`pixel_settings`) are checked against an earlier run
        in it.  ``None``: everything stays in memory and nothing is written.
    compute_fid, ref_stats, feature_extractor, inception_weights, metrics_batch_size
        Scores through :func:`lpd.metrics.compute_metrics`: FID against ``ref_stats`` (statistics
        file or ``(mu, sigma)``; ``None``: no FID) and IS from the extractor's logits.  The
        extractor defaults to torch-fidelity's Inception (weights from ``inception_weights`` or the
        torch hub cache).  Both are loaded on rank 0 **before** sampling, so missing files fail
        fast.  ``compute_fid=False`` skips scoring (FID/IS are ``None``).
    info
        Extra entries for the record (e.g. the command line).

    Returns
    -------
    dict
        The record written to ``metrics.json`` (on every rank): ``fid``, ``inception_score``,
        ``inception_score_std``, ``num_images``, ``settings``, ``sampling``, ``speed``, ``device``,
        ``dtype``, ``versions``, ``files``...
    """
    rank, world_size = _world(rank, world_size)
    model = _unwrap(model)
    device = model.pos_embed.device

    def load_scorer() -> tuple[Any, Any]:
        from lpd import metrics as M

        ref = None
        if ref_stats is not None:
            ref = M.load_statistics(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else tuple(ref_stats)
        extractor = feature_extractor
        if extractor is None:
            extractor = M.inception_extractor(inception_weights, device)
        return ref, extractor

    ref, extractor = (None, None)
    if compute_fid:
        loaded = _on_rank0(load_scorer, rank, "loading the reference statistics / feature extractor")
        ref, extractor = loaded if loaded is not None else (None, None)

    run_dir = os.fspath(output_dir) if output_dir is not None else None
    if run_dir is not None:
        prepare_run_dir(run_dir, settings or {}, rank)
    t_start = time.perf_counter()
    gen = generate_images(model, tokenizer, num_images, group_sizes,
                          output_dir=os.path.join(run_dir, IMAGES_DIR) if run_dir else None,
                          rank=rank, world_size=world_size, progress=progress, **sampling)
    sample_seconds = time.perf_counter() - t_start

    def finish() -> dict[str, Any]:
        return _finish(gen, run_dir, device, compute_fid, ref, extractor, ref_stats, metrics_batch_size, settings,
                       sampling, info, world_size, sample_seconds, grid_images, model, progress)

    record = _on_rank0(finish, rank, "after sampling (packing or scoring the images)")
    return broadcast_object(record)


def _finish(
    gen: GenerationResult,
    run_dir: str | None,
    device: torch.device,
    compute_fid: bool,
    ref: tuple[np.ndarray, np.ndarray] | None,
    extractor: Any,
    ref_stats: Any,
    metrics_batch_size: int,
    settings: Mapping[str, Any] | None,
    sampling: Mapping[str, Any],
    info: Mapping[str, Any] | None,
    world_size: int,
    sample_seconds: float,
    grid_images: int,
    model: torch.nn.Module,
    progress: bool,
) -> dict[str, Any]:
    files: dict[str, str] = {}
    source: Any = gen.images
    if run_dir is not None:
        paths = list(gen.image_paths or [])
        name = os.path.basename(os.path.normpath(run_dir))
        npz = os.path.join(run_dir, f"{name}.npz")
        write_npz(npz, paths, gen.image_size)
        files["images"] = os.path.join(run_dir, IMAGES_DIR)
        files["npz"] = npz
        first = [read_png(p, gen.image_size) for p in paths[:grid_images]]
        save_grid(os.path.join(run_dir, GRID_FILE), first)
        files["grid"] = os.path.join(run_dir, GRID_FILE)
        source = npz  # score exactly the pixels handed to the ADM evaluator
    scores: dict[str, Any] = {"fid": None, "inception_score": None, "inception_score_std": None}
    t0 = time.perf_counter()
    if compute_fid:
        from lpd import metrics as M

        scores.update(M.compute_metrics(source, ref, extractor, batch_size=metrics_batch_size, device=device,
                                        progress=progress))
    metrics_seconds = time.perf_counter() - t0
    scores.pop("num_images", None)
    bf16 = bool(sampling.get("bf16"))
    record: dict[str, Any] = {
        **scores,
        "num_images": gen.num_images,
        "image_size": list(gen.image_size),
        "settings": dict(settings or {}),
        "sampling": {k: v for k, v in sampling.items()
                     if isinstance(v, (int, float, str, bool, type(None), list))},
        "speed": gen.speed,
        "generated_this_run": gen.generated,
        "found_on_disk": gen.skipped,
        "sampling_wall_s": sample_seconds,
        "metrics_wall_s": metrics_seconds if compute_fid else None,
        "device": device_description(device),
        "device_type": device.type,
        "dtype": "bfloat16 autocast (transformer), float32 (tokenizer)" if bf16 else "float32",
        "world_size": world_size,
        "model_params": int(sum(p.numel() for p in model.parameters())),
        "ref_stats": os.fspath(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else None,
        "versions": library_versions(),
        "files": files,
        **dict(info or {}),
    }
    if run_dir is not None:
        files["metrics"] = os.path.join(run_dir, METRICS_FILE)
        data = json.dumps(record, indent=2, default=str).encode()
        atomic_write_bytes(files["metrics"], lambda f: f.write(data))
    return record


# ---------------------------------------------------------------------------------------------
# Model and tokenizer from entry-point settings
# ---------------------------------------------------------------------------------------------


def load_model(
    *,
    model: str | None,
    img_size: int | None,
    pretrained_ckpt: str | os.PathLike | None = None,
    random_init: bool = False,
    model_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.nn.Module, str]:
    """The LPD model an evaluation asks for, in eval mode on ``device``, and a label of its weights.

    * ``random_init``: the ``model`` preset (and/or ``model_config``) with weights drawn from
      ``torch.Generator().manual_seed(seed)`` -- identical on every rank; for speed and smoke tests.
    * ``pretrained_ckpt``: that file (our checkpoints carry their config; released ones need ``model``).
    * otherwise the released checkpoint of ``model`` at ``img_size`` through :mod:`lpd.hub`
      (Hugging Face cache, downloaded on rank 0 first; offline: an error naming file and repository).
    """
    from lpd.models import create_model, load_lpd

    overrides = dict(model_config or {})
    if random_init:
        if model is None and not overrides:
            raise EvaluationError("--random_init needs --model (e.g. lpd_l) or a model_config")
        net = create_model(model, int(img_size or 256), overrides)
        net.initialize_weights(torch.Generator().manual_seed(int(seed)))
        return net.to(device).eval(), f"random_init seed {int(seed)}"
    if pretrained_ckpt is None:
        if model is None:
            raise EvaluationError(
                "no model: pass --model (lpd_l, lpd_xl, lpd_xxl) with --img_size to use a released "
                "checkpoint, --pretrained_ckpt FILE, or --random_init")
        from lpd import hub

        path = rank0_first(lambda: hub.resolve_checkpoint(model, int(img_size or 256)), rank, world_size)
    else:
        from lpd import hub

        path = hub.local_file(pretrained_ckpt, what="LPD checkpoint", flag="--pretrained_ckpt")
    net = load_lpd(path, model=model, img_size=img_size, overrides=overrides or None)
    return net.to(device).eval(), os.path.basename(os.fspath(path))


def load_tokenizer(
    *,
    kind: str = "vq",
    vqgan_path: str | os.PathLike | None = None,
    vq_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.nn.Module, str]:
    """The tokenizer an evaluation asks for, and a label of its weights.

    ``kind="palette"``: the CPU demo's palette tokenizer.  ``kind="vq"``: ``vqgan_path``, or with a
    ``vq_config`` and no path a VQ with weights from ``seed`` (smoke tests; ``{}`` gives the
    released architecture, e.g. to time decoding offline), or else the released
    ``vq_ds16_c2i.pt`` through :mod:`lpd.hub`.
    """
    from lpd.tokenizer import make_tokenizer

    if kind == "palette":
        return make_tokenizer("palette", vq_config=dict(vq_config or {}), device=device), "palette"
    if kind != "vq":
        raise EvaluationError(f"unknown tokenizer {kind!r}; use 'vq' or 'palette'")
    if vqgan_path is None and vq_config is not None:  # {} = the released architecture, random weights
        tok = make_tokenizer("vq", vq_config=dict(vq_config), seed=int(seed), device=device)
        return tok, f"random vq seed {int(seed)}"
    from lpd import hub

    path = rank0_first(lambda: hub.resolve_vq(vqgan_path), rank, world_size)
    tok = make_tokenizer("vq", vqgan_path=path, vq_config=dict(vq_config) if vq_config else None, device=device)
    return tok, os.path.basename(os.fspath(path))
