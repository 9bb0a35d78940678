"""Sample an evaluation set (deterministic, sharded, resumable) and score it: FID, IS, speed.

Image ``i`` depends only on ``(seed, i)`` and the settings; the run folder is described in docs/design.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lpd.checkpoint import TMP_PREFIX, atomic_write_bytes, lock_folder, state_dict_digest
from lpd.devices import device_description, library_versions, synchronize
from lpd.distributed import barrier, gather_object, on_rank0
from lpd.images import image_path, read_png, save_grid, to_uint8, write_npz, write_png
from lpd.orders.source import OrderSource
from lpd.sampling import SamplingConfig, derive_seed, sample_tokens
from lpd.schedules import validate_group_sizes

__all__ = [
    "EvaluationError",
    "image_classes",
    "image_seed",
    "SpeedMeter",
    "GenerationResult",
    "sample_batch",
    "decode_tokens",
    "generate_images",
    "run_settings",
    "prepare_run_dir",
    "evaluate",
    "DECODE_CHUNK",
]

SETTINGS, METRICS, TOKENS, GRID, IMAGES = (
    "settings.json",
    "metrics.json",
    "tokens.npy",
    "samples_grid.png",
    "images",
)
DECODE_CHUNK = 8  # the VQ decodes every batch in chunks of this many images (padded): pixels do not depend on eval_bsz


class EvaluationError(ValueError):
    """Settings or files that do not allow an evaluation run (raised before any image is sampled)."""


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise EvaluationError(f"--{name} must be a positive integer, got {value!r}")
    return int(value)


def image_classes(
    indices: Sequence[int] | np.ndarray, num_images: int, class_num: int
) -> np.ndarray:
    """Class of each image index, ``floor(i * class_num / num_images)``: 50 per class for 50,000 of 1,000."""
    return (np.asarray(indices, dtype=np.int64) * int(class_num)) // _positive(
        "num_images", num_images
    )


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s sampling generator."""
    return derive_seed(seed, index)


@dataclass
class SpeedMeter:
    """Wall time per batch after the first (warm-up) one, for tokens and for tokens + VQ decoding."""

    batches: list[tuple[int, float, float]] = field(
        default_factory=list
    )  # (images, token s, total s)
    warmup_done: bool = False

    def add(self, images: int, token_seconds: float, total_seconds: float) -> None:
        if self.warmup_done:
            self.batches.append((images, token_seconds, total_seconds))
        self.warmup_done = True

    def summary(self) -> dict[str, Any]:
        """Speed of every process and in all (gathers over the process group: call it on every rank)."""
        per_rank = gather_object(self.batches)
        timed = [b for r in per_rank for b in r]

        def rate(col: int) -> dict[str, float | None]:
            images, seconds = sum(b[0] for b in timed), sum(b[col] for b in timed)
            if not timed or seconds <= 0:
                return {"images_per_s": None, "s_per_image": None, "s_per_batch": None}
            return {
                "images_per_s": images / seconds,
                "s_per_image": seconds / images,
                "s_per_batch": seconds / len(timed),
            }

        def total(col: int) -> float | None:
            rates = [
                sum(b[0] for b in r) / t for r in per_rank if (t := sum(b[col] for b in r)) > 0
            ]
            return float(sum(rates)) if rates and len(rates) == len(per_rank) else None

        return {
            "processes": len(per_rank),
            "timed_batches": len(timed),
            "images_per_batch": max((b[0] for b in timed), default=None),
            "note": "wall time per batch after each process's first (warm-up) batch, with device synchronisation",
            "tokens": rate(1),
            "tokens_and_decode": rate(2),
            "total_images_per_s": {"tokens": total(1), "tokens_and_decode": total(2)},
        }


def decode_tokens(
    tokenizer: torch.nn.Module, tokens: torch.Tensor, sampling: SamplingConfig
) -> np.ndarray:
    """Raster tokens ``[B, N]`` -> uint8 ``[B, H, W, 3]`` in padded chunks of :data:`DECODE_CHUNK`, bf16 as ``sampling`` says."""
    B, g = tokens.shape[0], int(round(tokens.shape[1] ** 0.5))
    bf16 = sampling.bf16 and not sampling.decode_fp32
    amp = (
        torch.autocast(tokens.device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    out = []
    with torch.no_grad(), amp:
        for c in range(0, B, DECODE_CHUNK):
            chunk, n = tokens[c : c + DECODE_CHUNK], min(DECODE_CHUNK, B - c)
            chunk = (
                torch.cat([chunk, chunk[-1:].expand(DECODE_CHUNK - n, -1)])
                if n < DECODE_CHUNK
                else chunk
            )
            out.append(to_uint8(tokenizer.decode(chunk.view(DECODE_CHUNK, g, g)))[:n])
    return np.concatenate(out)


@torch.no_grad()
def sample_batch(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    indices: np.ndarray,
    labels: np.ndarray,
    orders: np.ndarray,
    group_sizes: Sequence[int],
    sampling: SamplingConfig,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(uint8 images, raster tokens, token seconds, token + decode seconds); row ``r`` draws from image ``indices[r]``'s seed."""
    device = model.pos_embed.device
    gens = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]
    synchronize(device)
    t0 = time.perf_counter()
    tokens = sample_tokens(
        model, labels, orders, group_sizes, sampling, generator=gens
    )  # checked on the host, then moved
    synchronize(device)
    t1 = time.perf_counter()
    pixels = decode_tokens(tokenizer, tokens, sampling)  # copies to the host: synchronises
    return pixels, tokens.cpu().numpy(), t1 - t0, time.perf_counter() - t0


@dataclass
class GenerationResult:
    """What :func:`generate_images` did: images/tokens (no output folder) or PNG paths, counts over all ranks, speed."""

    num_images: int
    image_size: tuple[int, int]
    images: np.ndarray | None
    tokens: np.ndarray | None
    image_paths: list[str] | None
    generated: int
    skipped: int
    speed: dict[str, Any]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "pos_embed") and isinstance(
        getattr(model, "module", None), torch.nn.Module
    ):
        model = model.module  # DistributedDataParallel and similar wrappers
    return model


def _check_labels(labels: Any, num_images: int, class_num: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu" or arr.shape != (num_images,):
        raise EvaluationError(
            f"labels must be {num_images} integers (one per image), got {arr.dtype} {list(arr.shape)}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= class_num):
        raise EvaluationError(f"labels must lie in 0..{class_num - 1}")
    return arr.astype(np.int64)


def _image_size(model: torch.nn.Module, tokenizer: torch.nn.Module) -> tuple[int, int]:
    """(H, W) of the decoded images: the model's ``img_size``, else EvaluationError (a tokenizer of another stride)."""
    grid, size = (
        int(model.grid_size),
        int(model.grid_size) * int(getattr(tokenizer, "downsample_factor", 16)),
    )
    if size != int(model.config.img_size):
        raise EvaluationError(
            f"the tokenizer turns the model's {grid}x{grid} tokens into {size} px images, not the "
            f"model's {model.config.img_size} px: give the tokenizer it was trained with "
            f"(--vqgan_path / --vq_config)"
        )
    return size, size


def generate_images(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    num_images: int,
    group_sizes: Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    orders: np.ndarray | OrderSource | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    eval_bsz: int = 64,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
    **settings: Any,
) -> GenerationResult:
    """Sample ``num_images`` images (image ``i`` on rank ``i % world_size``) into the :func:`prepare_run_dir` folder
    ``output_dir`` (keeping those there) or, with None, return them; ``shard``: ``(rank, world_size)`` without a group."""
    sampling = (sampling or SamplingConfig()).replace(**settings)
    group = (
        (dist.get_rank(), dist.get_world_size())
        if dist.is_available() and dist.is_initialized()
        else (0, 1)
    )
    model, (rank, world) = _unwrap(model), shard or group
    if shard is not None and (not 0 <= rank < world or (output_dir is None and world > 1)):
        raise EvaluationError(
            f"shard {shard}: rank must lie in 0..world_size-1, and shards without a process "
            f"group write to an output folder"
        )
    num_images, eval_bsz = _positive("num_images", num_images), _positive("eval_bsz", eval_bsz)
    N, grid = int(model.num_tokens), int(model.grid_size)
    sizes = validate_group_sizes(group_sizes, N)
    source = (
        orders
        if isinstance(orders, OrderSource)
        else OrderSource(
            sampling.order,
            sizes,
            grid,
            seed=seed,
            proximity_threshold=sampling.proximity_threshold,
            repulsion_threshold=sampling.repulsion_threshold,
            table=orders,
        )
    )
    all_labels = (
        image_classes(np.arange(num_images), num_images, model.class_num)
        if labels is None
        else _check_labels(labels, num_images, int(model.class_num))
    )
    size = _image_size(model, tokenizer)
    mine = np.arange(rank, num_images, world)
    store, todo = None, mine
    if output_dir is not None:
        image_dir, tokens_path = os.path.join(output_dir, IMAGES), os.path.join(output_dir, TOKENS)
        if not os.path.isfile(tokens_path):
            raise EvaluationError(
                f"{tokens_path!r} does not exist: make the run folder with prepare_run_dir first"
            )
        store = np.load(tokens_path, mmap_mode="r+")
        if store.shape != (num_images, N):
            raise EvaluationError(
                f"{tokens_path!r} holds {list(store.shape)} tokens, not [{num_images}, {N}]"
            )
        done = np.array(
            [
                store[i, 0] >= 0 and read_png(image_path(image_dir, i), size) is not None
                for i in mine
            ],
            dtype=bool,
        )
        todo = mine[~done]
    meter, kept = SpeedMeter(), {}
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="sampling (rank 0)",
        unit="img",
        dynamic_ncols=True,
        disable=not (progress and rank == 0),
    )
    for b0 in range(0, len(todo), eval_bsz):
        batch = todo[b0 : b0 + eval_bsz]
        pixels, tokens, t_tok, t_all = sample_batch(
            model, tokenizer, batch, all_labels[batch], source.rows(batch), sizes, sampling, seed
        )
        meter.add(len(batch), t_tok, t_all)
        if tuple(pixels.shape[1:3]) != size:
            raise EvaluationError(
                f"the tokenizer decoded {list(pixels.shape[1:3])} images, expected {list(size)}"
            )
        if store is None:
            kept.update(zip(batch.tolist(), zip(pixels, tokens)))
        else:
            store[batch] = tokens  # tokens first: an image counts as done once its PNG exists
            store.flush()
            for i, im in zip(batch.tolist(), pixels):
                write_png(image_path(image_dir, i), im)
        bar.update(len(batch))
    bar.close()
    speed = meter.summary()
    counts = gather_object((len(todo), len(mine) - len(todo)))
    images = tokens_out = paths = None
    if store is None:
        for part in gather_object(kept):
            kept.update(part)
        images, tokens_out = (np.stack([kept[i][j] for i in range(num_images)]) for j in (0, 1))
    else:
        barrier()
        paths = [image_path(image_dir, i) for i in range(num_images)]
    return GenerationResult(
        num_images,
        size,
        images,
        tokens_out,
        paths,
        sum(c[0] for c in counts),
        sum(c[1] for c in counts),
        speed,
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_settings(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    num_images: int,
    group_sizes: Sequence[int],
    sampling: SamplingConfig,
    seed: int,
    *,
    name: str | None = None,
    labels: Any = None,
    orders: Any = None,
    order_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What the pixels of a run depend on, by content (digests of weights, tokenizer, orders; every setting)."""
    from lpd.datasets import tokenizer_id

    model = _unwrap(model)
    out: dict[str, Any] = {
        "model": name,
        "weights_sha256": state_dict_digest(model),
        "tokenizer": tokenizer_id(tokenizer),
        "img_size": int(model.config.img_size),
        "num_images": int(num_images),
        "group_sizes": [int(g) for g in group_sizes],
        "seed": int(seed),
        **sampling.to_dict(),
        "labels": "rule"
        if labels is None
        else _sha256(np.asarray(labels, dtype=np.int64).tobytes()),
    }
    if order_file is not None:
        with open(order_file, "rb") as f:
            out["order_file"], out["order_file_sha256"] = (
                os.path.basename(os.fspath(order_file)),
                _sha256(f.read()),
            )
    elif orders is not None:
        out["orders_sha256"] = _sha256(np.ascontiguousarray(orders, dtype=np.int64).tobytes())
    if order_file is not None or orders is not None or sampling.order != "lpd":
        del out["proximity_threshold"], out["repulsion_threshold"]
    return out


_HELD: dict[str, int] = {}  # run folders this process holds: real path -> descriptor of the lock


def _hold(run_dir: str) -> bool:
    """Hold ``run_dir`` until :func:`evaluate` ends (False where the file system has no locks); a folder
    another process holds is refused at once."""
    key = os.path.realpath(run_dir)
    if key not in _HELD:
        try:
            fd = lock_folder(run_dir)
        except BlockingIOError as e:
            raise EvaluationError(
                f"run folder {e}: another evaluation is writing into it. Wait until it ends (a rerun "
                f"then samples only what is missing), or use another --output_dir / --run_name."
            ) from None
        if fd is None:
            return False
        _HELD[key] = fd
    return True


def _release(run_dir: str) -> None:
    fd = _HELD.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def prepare_run_dir(
    run_dir: str | os.PathLike, settings: Mapping[str, Any], num_tokens: int
) -> str:
    """Create the run folder with ``settings.json`` and ``tokens.npy``, or check one of the same run; a folder of
    another run, of lost settings, or that another process holds, is refused. This process holds the folder
    (rank 0, until :func:`evaluate` ends) and removes a killed run's temporary files. Call it on every rank."""
    run_dir = os.fspath(run_dir)

    def prepare() -> None:
        image_dir, path, tokens = (os.path.join(run_dir, n) for n in (IMAGES, SETTINGS, TOKENS))
        os.makedirs(image_dir, exist_ok=True)
        held = _hold(
            run_dir
        )  # no other process writes here: its temporary files are a killed run's
        new = json.loads(json.dumps(dict(settings)))
        start_over = f"Use another --output_dir / --run_name, or delete {run_dir!r} to start over."
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    old = json.load(f)
            except (OSError, ValueError) as e:
                raise EvaluationError(
                    f"{path!r} cannot be read ({e}): the images in {run_dir!r} cannot be trusted. {start_over}"
                ) from None
            diff = [
                f"{k}: {old.get(k)!r} on disk vs {new.get(k)!r} now"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
            if diff:
                raise EvaluationError(
                    f"run folder {run_dir!r} holds images sampled with other inputs:\n  "
                    + "\n  ".join(diff)
                    + f"\n{start_over}"
                )
        else:
            if os.path.exists(tokens) or any(n.endswith(".png") for n in os.listdir(image_dir)):
                raise EvaluationError(
                    f"run folder {run_dir!r} holds images but no {SETTINGS}: what they were sampled "
                    f"with is unknown, so they cannot be reused. {start_over}"
                )
            data = json.dumps(new, indent=2, sort_keys=True).encode()
            atomic_write_bytes(path, lambda f: f.write(data))
        n = int(settings["num_images"])
        if os.path.isfile(tokens):
            try:
                ok = np.load(tokens, mmap_mode="r").shape == (n, num_tokens)
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise EvaluationError(f"{tokens!r} is damaged or of another run. {start_over}")
        else:
            tmp = os.path.join(run_dir, TMP_PREFIX + TOKENS)
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int16, shape=(n, num_tokens))
            arr[:] = -1  # -1: not sampled yet
            arr.flush()
            del arr
            os.replace(tmp, tokens)
        for name in os.listdir(image_dir) if held else ():
            if name.startswith(TMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(image_dir, name))

    on_rank0(prepare, "preparing the run folder")
    barrier()
    return run_dir


def evaluate(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    num_images: int,
    group_sizes: Sequence[int],
    sampling: SamplingConfig | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    order_file: str | os.PathLike | None = None,
    compute_fid: bool = True,
    ref_stats: Any = None,
    feature_extractor: Callable | None = None,
    inception_weights: str | os.PathLike | None = None,
    metrics_batch_size: int = 50,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
    grid_images: int = 64,
    orders: Any = None,
    labels: Any = None,
    seed: int = 0,
    eval_bsz: int = 64,
    **settings: Any,
) -> dict[str, Any]:
    """Sample (:func:`generate_images`), pack, score (FID against ``ref_stats``, IS; on Inception or
    ``feature_extractor``, both loaded before sampling) and record one run; returns the record (every rank)."""
    from lpd import metrics as M

    sampling = (sampling or SamplingConfig()).replace(**settings)
    model = _unwrap(model)
    device = model.pos_embed.device
    _image_size(model, tokenizer)  # before anything is loaded or written

    def load_scorer() -> tuple[Any, Any]:
        ref = (
            M.load_statistics(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else ref_stats
        )
        extractor = feature_extractor or M.inception_extractor(inception_weights, device)
        if ref is not None:  # the features' width, of one black image
            size = int(model.config.img_size)
            with torch.inference_mode():
                dim = int(
                    np.prod(
                        extractor(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=device))[
                            0
                        ].shape[1:]
                    )
                )
            if np.shape(ref[0]) != (dim,):
                where = f" {ref_stats}" if isinstance(ref_stats, (str, os.PathLike)) else ""
                raise EvaluationError(
                    f"the reference statistics{where} are of {np.shape(ref[0])[0]}-d features, the "
                    f"feature extractor gives {dim}-d ones: give statistics of this extractor "
                    f"(python -m lpd.metrics stats)"
                )
        return ref, extractor

    scorer = (
        on_rank0(
            load_scorer, "loading the reference statistics / feature extractor", broadcast=False
        )
        if compute_fid
        else None
    )
    run_dir = os.fspath(output_dir) if output_dir is not None else None
    try:
        record_settings: dict[str, Any] = {}
        if run_dir is not None:
            record_settings = on_rank0(
                lambda: run_settings(
                    model,
                    tokenizer,
                    num_images,
                    group_sizes,
                    sampling,
                    seed,
                    name=name,
                    labels=labels,
                    orders=orders,
                    order_file=order_file,
                )
            )
            prepare_run_dir(run_dir, record_settings, int(model.num_tokens))
        t0 = time.perf_counter()
        gen = generate_images(
            model,
            tokenizer,
            num_images,
            group_sizes,
            sampling,
            orders=orders,
            labels=labels,
            seed=seed,
            eval_bsz=eval_bsz,
            output_dir=run_dir,
            progress=progress,
        )
        sample_seconds = time.perf_counter() - t0

        def finish() -> dict[str, Any]:
            files, source, old = {}, gen.images, {}
            if run_dir is not None:
                npz = os.path.join(run_dir, os.path.basename(os.path.normpath(run_dir)) + ".npz")
                write_npz(npz, gen.image_paths, gen.image_size)
                save_grid(
                    os.path.join(run_dir, GRID),
                    [read_png(p, gen.image_size) for p in gen.image_paths[:grid_images]],
                )
                files = {
                    "images": os.path.join(run_dir, IMAGES),
                    "tokens": os.path.join(run_dir, TOKENS),
                    "npz": npz,
                    "grid": os.path.join(run_dir, GRID),
                    "metrics": os.path.join(run_dir, METRICS),
                }
                source = npz  # score exactly the pixels handed to the ADM evaluator
                with contextlib.suppress(OSError, ValueError):
                    with open(files["metrics"], encoding="utf-8") as f:
                        old = json.load(f)
            scores = {"fid": None, "inception_score": None, "inception_score_std": None}
            t1 = time.perf_counter()
            if compute_fid:
                scores.update(
                    {
                        k: v
                        for k, v in M.compute_metrics(
                            source,
                            scorer[0],
                            scorer[1],
                            batch_size=metrics_batch_size,
                            device=device,
                            progress=progress,
                        ).items()
                        if k in scores
                    }
                )
            elif old:  # not scored now: keep the earlier scores of the same images
                scores = {k: old.get(k) for k in scores}
            timed = gen.speed["timed_batches"] > 0
            record = {
                **scores,
                "num_images": gen.num_images,
                "image_size": list(gen.image_size),
                "settings": record_settings,
                "sampling": sampling.to_dict(),
                "seed": seed,
                "eval_bsz": eval_bsz,
                "speed": gen.speed if timed or "speed" not in old else old["speed"],
                "generated_this_run": gen.generated,
                "found_on_disk": gen.skipped,
                "sampling_wall_s": sample_seconds,
                "metrics_wall_s": time.perf_counter() - t1
                if compute_fid
                else old.get("metrics_wall_s"),
                "device": device_description(device)
                if timed or "device" not in old
                else old["device"],
                "dtype": "bfloat16 autocast" if sampling.bf16 else "float32",
                "world_size": gen.speed["processes"],
                "model_params": sum(p.numel() for p in model.parameters()),
                "ref_stats": os.fspath(ref_stats)
                if isinstance(ref_stats, (str, os.PathLike))
                else None,
                "versions": library_versions(),
                "files": files,
                **dict(info or {}),
            }
            if run_dir is not None:
                data = json.dumps(record, indent=2, default=str).encode()
                atomic_write_bytes(files["metrics"], lambda f: f.write(data))
            return record

        return on_rank0(finish, "after sampling (packing or scoring the images)")
    finally:
        if run_dir is not None:
            _release(run_dir)
