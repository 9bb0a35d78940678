"""Sample an evaluation set (deterministic, sharded, resumable) and score it: FID, IS, speed.
Image ``i`` depends only on ``(seed, i)`` and the settings."""

from __future__ import annotations

import contextlib
import dataclasses
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

from lpd import metrics as M
from lpd.config import check_labels, check_positive, check_seed, derive_seed
from lpd.datasets import tokenizer_id
from lpd.devices import device_description, library_versions, synchronize
from lpd.distributed import barrier, gather_object, on_rank0
from lpd.files import TMP_PREFIX, atomic_write_bytes, lock_folder, state_dict_digest
from lpd.images import image_path, read_png, save_grid, write_npz, write_png
from lpd.orders.source import OrderSource
from lpd.sampling import Decoder, SamplingConfig, decode_tokens
from lpd.schedules import validate_group_sizes

__all__ = ["EvaluationError", "RunSpec", "Scoring", "generate_images", "evaluate", "decode_tokens"]

SETTINGS, METRICS, TOKENS = "settings.json", "metrics.json", "tokens.npy"
GRID, IMAGES = "samples_grid.png", "images"
image_seed = derive_seed  # the seed of image ``index``'s sampling generator: (seed, index)


class EvaluationError(ValueError):
    """Settings or files that do not allow an evaluation run (raised before any image is sampled)."""


def image_classes(indices: Sequence[int], num_images: int, class_num: int) -> np.ndarray:
    """Class of image ``i``: ``floor(i * class_num / num_images)`` (50 a class for 50,000 of 1,000)."""
    n = check_positive(num_images, "--num_images", EvaluationError)
    return (np.asarray(indices, dtype=np.int64) * int(class_num)) // n


def sampling_orders(
    sampling: SamplingConfig, sizes: Sequence[int], grid: int, seed: int, table: Any = None
) -> OrderSource:
    """``table`` if an :class:`OrderSource`, else that of its rows or of ``sampling``'s order."""
    if isinstance(table, OrderSource):
        return table
    tp, tr = sampling.proximity_threshold, sampling.repulsion_threshold
    kw = dict(seed=seed, table=table, proximity_threshold=tp, repulsion_threshold=tr)
    return OrderSource(sampling.order, sizes, grid, **kw)


@dataclass(frozen=True)
class RunSpec:
    """What a run generates: ``num_images`` images in groups of ``group_sizes``; image ``i`` of
    class ``labels[i]`` (None: :func:`image_classes`), order ``orders[i]`` (a table, OrderSource,
    or None: the sampling's; ``order_file``: recorded by digest), seed ``(seed, i)``."""

    num_images: int
    group_sizes: Sequence[int]
    labels: Any = None
    orders: Any = None
    order_file: str | os.PathLike | None = None
    seed: int = 0
    eval_bsz: int = 64

    def checked(self, model: torch.nn.Module) -> RunSpec:
        """This spec checked against ``model`` (the one check): sizes as a list, labels int64."""
        n = check_positive(self.num_images, "--num_images", EvaluationError)
        check_positive(self.eval_bsz, "--eval_bsz", EvaluationError)
        check_seed(self.seed)
        labels = self.labels
        if labels is not None and not hasattr(labels, "settings"):  # prompts: checked when read
            labels = check_labels(labels, n, int(model.class_num), error=EvaluationError)
        sizes = validate_group_sizes(self.group_sizes, int(model.num_tokens))
        return dataclasses.replace(self, group_sizes=sizes, labels=labels)


@dataclass(frozen=True)
class Scoring:
    """How :func:`evaluate` scores: IS and, with ``ref_stats`` (a file or ``(mu, sigma)``), FID on
    Inception-v3 (``inception_weights``) or ``feature_extractor``, ``batch_size`` images a batch."""

    ref_stats: Any = None
    feature_extractor: Callable | None = None
    inception_weights: str | os.PathLike | None = None
    batch_size: int = 50


@dataclass
class SpeedMeter:
    """Wall time per batch after the first (warm-up) one, for tokens and for tokens + VQ decoding."""

    batches: list[tuple[int, float, float]] = field(default_factory=list)  # images, token s, all s
    warmup_done: bool = False

    def add(self, images: int, token_seconds: float, total_seconds: float) -> None:
        if self.warmup_done:
            self.batches.append((images, token_seconds, total_seconds))
        self.warmup_done = True

    def summary(self) -> dict[str, Any]:
        """Speed of every process and in all (gathers over the process group: call on every rank)."""
        per_rank, keys = gather_object(self.batches), ("images_per_s", "s_per_image", "s_per_batch")
        timed = [b for r in per_rank for b in r]

        def rate(col: int) -> dict[str, float | None]:
            images, seconds = sum(b[0] for b in timed), sum(b[col] for b in timed)
            per = (images / seconds, seconds / images, seconds / len(timed)) if seconds > 0 else ()
            return dict.fromkeys(keys) | dict(zip(keys, per))

        def total(col: int) -> float | None:
            rates = [sum(b[0] for b in r) / t for r in per_rank if (t := sum(b[col] for b in r))]
            return float(sum(rates)) if rates and len(rates) == len(per_rank) else None

        return {
            "processes": len(per_rank),
            "timed_batches": len(timed),
            "images_per_batch": max((b[0] for b in timed), default=None),
            "note": "wall time per batch after each process's first (warm-up) batch, with device "
            "synchronisation",
            "tokens": rate(1),
            "tokens_and_decode": rate(2),
            "total_images_per_s": {"tokens": total(1), "tokens_and_decode": total(2)},
        }


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
    """(uint8 images, raster tokens, token s, token + decode s); row ``r``: image ``indices[r]``."""
    device = model.pos_embed.device
    gens = [torch.Generator().manual_seed(image_seed(seed, int(i))) for i in indices]
    synchronize(device)
    t0 = time.perf_counter()
    if hasattr(labels, "sample"):  # the prompts of a text model (lpd.text.prompts.PromptSet)
        tokens = labels.sample(model, orders, group_sizes, sampling, gens)
    else:
        tokens = Decoder(model, sampling).sample(labels, orders, group_sizes, gens)
    synchronize(device)
    t1 = time.perf_counter()
    pixels = decode_tokens(tokenizer, tokens, sampling)  # copies to the host: synchronises
    return pixels, tokens.cpu().numpy(), t1 - t0, time.perf_counter() - t0


@dataclass
class GenerationResult:
    """Images/tokens (no output folder) or PNG paths, counts over all ranks, speed."""

    num_images: int
    image_size: tuple[int, int]
    images: np.ndarray | None
    tokens: np.ndarray | None
    image_paths: list[str] | None
    generated: int
    skipped: int
    speed: dict[str, Any]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and similar wrappers."""
    while not hasattr(model, "pos_embed") and isinstance(
        getattr(model, "module", None), torch.nn.Module
    ):
        model = model.module
    return model


def _image_size(model: torch.nn.Module, tokenizer: torch.nn.Module) -> tuple[int, int]:
    """(H, W) of the decoded images: the model's ``img_size``, else EvaluationError."""
    grid = int(model.grid_size)
    size = grid * int(getattr(tokenizer, "downsample_factor", 16))
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
    spec: RunSpec,
    sampling: SamplingConfig | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
    shard: tuple[int, int] | None = None,
) -> GenerationResult:
    """Sample ``spec``'s images (image ``i`` on rank ``i % world_size``) into the run folder
    ``output_dir``, keeping those there, or return them; ``shard``: (rank, world) without a
    group."""
    model, sampling = _unwrap(model), sampling or SamplingConfig()
    if shard and not (0 <= shard[0] < shard[1] and (output_dir is not None or shard[1] == 1)):
        raise EvaluationError(
            f"shard {shard}: rank must lie in 0..world_size-1, and shards without a process "
            f"group write to an output folder"
        )
    size, spec = _image_size(model, tokenizer), spec.checked(model)
    return _generate(model, tokenizer, spec, sampling, output_dir, progress, shard, size)


def _generate(model, tokenizer, spec, sampling, folder, progress, shard, size) -> GenerationResult:
    """:func:`generate_images` of checked inputs."""
    on = dist.is_available() and dist.is_initialized()
    group = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
    (rank, world), num, N = shard or group, spec.num_images, int(model.num_tokens)
    source = sampling_orders(sampling, spec.group_sizes, model.grid_size, spec.seed, spec.orders)
    labels = spec.labels
    labels = image_classes(np.arange(num), num, model.class_num) if labels is None else labels
    store, todo = None, (mine := np.arange(rank, num, world))
    if folder is not None:
        pngs, toks = os.path.join(folder, IMAGES), os.path.join(folder, TOKENS)
        if not os.path.isfile(toks):
            raise EvaluationError(
                f"{toks!r} does not exist: make the run folder with prepare_run_dir first"
            )
        if (store := np.load(toks, mmap_mode="r+")).shape != (num, N):
            raise EvaluationError(f"{toks!r} holds {list(store.shape)} tokens, not [{num}, {N}]")
        done = [store[i, 0] >= 0 and read_png(image_path(pngs, i), size) is not None for i in mine]
        todo = mine[~np.array(done, dtype=bool)]
    meter, kept, style = SpeedMeter(), {}, dict(unit="img", dynamic_ncols=True)
    hide, skipped = not (progress and rank == 0), len(mine) - len(todo)
    bar = tqdm(total=len(mine), initial=skipped, desc="sampling (rank 0)", disable=hide, **style)
    for b0 in range(0, len(todo), spec.eval_bsz):
        batch = todo[b0 : b0 + spec.eval_bsz]
        args = (batch, labels[batch], source.rows(batch), spec.group_sizes, sampling, spec.seed)
        pixels, tokens, t_tok, t_all = sample_batch(model, tokenizer, *args)
        meter.add(len(batch), t_tok, t_all)
        if tuple(pixels.shape[1:3]) != size:
            got = list(pixels.shape[1:3])
            raise EvaluationError(f"the tokenizer decoded {got} images, expected {list(size)}")
        if store is None:
            kept.update(zip(batch.tolist(), zip(pixels, tokens)))
        else:
            store[batch] = tokens  # tokens first: an image counts as done once its PNG exists
            store.flush()
            for i, im in zip(batch.tolist(), pixels):
                write_png(image_path(pngs, i), im)
        bar.update(len(batch))
    bar.close()
    speed = meter.summary()
    counts = gather_object((len(todo), skipped))
    images = tokens_out = paths = None
    if store is None:
        for part in gather_object(kept):
            kept.update(part)
        images, tokens_out = (np.stack([kept[i][j] for i in range(num)]) for j in (0, 1))
    else:
        barrier()
        paths = [image_path(pngs, i) for i in range(num)]
    made, found = sum(c[0] for c in counts), sum(c[1] for c in counts)
    return GenerationResult(num, size, images, tokens_out, paths, made, found, speed)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _digest(table: Any) -> str:
    return _sha256(np.ascontiguousarray(table, dtype=np.int64).tobytes())


def run_settings(
    model: torch.nn.Module,
    tokenizer: torch.nn.Module,
    spec: RunSpec,
    sampling: SamplingConfig,
    name: str | None = None,
) -> dict[str, Any]:
    """What the pixels of a run depend on: digests of weights, tokenizer, orders; every setting."""
    model, labels, orders = _unwrap(model), spec.labels, spec.orders
    if labels is not None:  # a digest, or the settings of prompts
        labels = labels.settings() if hasattr(labels, "settings") else _digest(labels)
    out: dict[str, Any] = {
        "model": name,
        "weights_sha256": state_dict_digest(model),
        "tokenizer": tokenizer_id(tokenizer),
        "img_size": int(model.config.img_size),
        "num_images": int(spec.num_images),
        "group_sizes": [int(g) for g in spec.group_sizes],
        "seed": int(spec.seed),
        **sampling.to_dict(),
        "labels": "rule" if labels is None else labels,
    }
    if spec.order_file is not None:
        with open(spec.order_file, "rb") as f:
            out["order_file_sha256"] = _sha256(f.read())
        out["order_file"] = os.path.basename(os.fspath(spec.order_file))
    elif orders is not None:
        out["orders_sha256"] = _digest(orders)
    if spec.order_file is not None or orders is not None or sampling.order != "lpd":
        del out["proximity_threshold"], out["repulsion_threshold"]
    return out


_HELD: dict[str, int] = {}  # run folders this process holds: real path -> descriptor of the lock


def _hold(run_dir: str) -> bool:
    """Hold ``run_dir`` until :func:`evaluate` ends (False: no file locks); refuse a held folder."""
    key = os.path.realpath(run_dir)
    try:
        fd = _HELD.get(key) or lock_folder(run_dir)
    except BlockingIOError as e:
        raise EvaluationError(
            f"run folder {e}: another evaluation is writing into it. Wait until it ends (a rerun "
            f"then samples only what is missing), or use another --output_dir / --run_name."
        ) from None
    if fd is not None:
        _HELD[key] = fd
    return fd is not None


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data: Any, **options: Any) -> None:
    text = json.dumps(data, indent=2, **options).encode()
    atomic_write_bytes(path, lambda f: f.write(text))


def prepare_run_dir(run_dir: str | os.PathLike, settings: Mapping, num_tokens: int) -> str:
    """Create the run folder (``settings.json``, ``tokens.npy``) or check one of the same run, on
    every rank; rank 0 holds it until :func:`evaluate` ends, removes a killed run's temp files."""
    run_dir = os.fspath(run_dir)

    def prepare() -> None:
        image_dir, path, tokens = (os.path.join(run_dir, n) for n in (IMAGES, SETTINGS, TOKENS))
        os.makedirs(image_dir, exist_ok=True)
        held = _hold(run_dir)  # no other writer: its temporary files are a killed run's
        new = json.loads(json.dumps(dict(settings)))
        start_over = f"Use another --output_dir / --run_name, or delete {run_dir!r} to start over."
        if os.path.isfile(path):
            try:
                old = _read_json(path)
            except (OSError, ValueError) as e:
                raise EvaluationError(
                    f"{path!r} cannot be read ({e}): the images in {run_dir!r} cannot be trusted. "
                    f"{start_over}"
                ) from None
            if keys := [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]:
                diff = "".join(
                    f"\n  {k}: {old.get(k)!r} on disk vs {new.get(k)!r} now" for k in keys
                )
                msg = f"run folder {run_dir!r} holds images sampled with other inputs:{diff}\n"
                raise EvaluationError(msg + start_over)
        elif os.path.exists(tokens) or any(n.endswith(".png") for n in os.listdir(image_dir)):
            raise EvaluationError(
                f"run folder {run_dir!r} holds images but no {SETTINGS}: what they were sampled "
                f"with is unknown, so they cannot be reused. {start_over}"
            )
        else:
            _write_json(path, new, sort_keys=True)
        n = int(settings["num_images"])
        if os.path.isfile(tokens):
            try:
                ok = np.load(tokens, mmap_mode="r").shape == (n, num_tokens)
            except (OSError, ValueError):
                ok = False
            if not ok:
                raise EvaluationError(f"{tokens!r} is damaged or of another run. {start_over}")
        else:  # -1: not sampled yet
            atomic_write_bytes(tokens, lambda f: np.save(f, np.full((n, num_tokens), -1, np.int16)))
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
    spec: RunSpec,
    sampling: SamplingConfig | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    name: str | None = None,
    scoring: Scoring | None = Scoring(),
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
    grid_images: int = 64,
) -> dict[str, Any]:
    """Sample (:func:`generate_images`), pack, score (``scoring``; None: not scored; loaded before
    sampling) and record one run; returns the record (every rank)."""
    sampling, model = sampling or SamplingConfig(), _unwrap(model)
    device, size = model.pos_embed.device, _image_size(model, tokenizer)  # before any loading
    spec = spec.checked(model)
    ref_stats = None if scoring is None else scoring.ref_stats
    ref_file = os.fspath(ref_stats) if isinstance(ref_stats, (str, os.PathLike)) else None

    def load_scorer() -> tuple[Any, Any]:
        ref = M.load_statistics(ref_file) if ref_file else ref_stats
        extractor = scoring.feature_extractor
        extractor = extractor or M.inception_extractor(scoring.inception_weights, device)
        if ref is not None:  # the features' width, of one black image
            with torch.inference_mode():
                black = torch.zeros(1, 3, *size, dtype=torch.uint8, device=device)
                dim = int(np.prod(extractor(black)[0].shape[1:]))
            if np.shape(ref[0]) != (dim,):
                raise EvaluationError(
                    f"the reference statistics{f' {ref_file}' if ref_file else ''} are of "
                    f"{np.shape(ref[0])[0]}-d features, the feature extractor gives {dim}-d ones: "
                    f"give statistics of this extractor (python -m lpd.metrics stats)"
                )
        return ref, extractor

    what = "loading the reference statistics / feature extractor"
    scorer = None if scoring is None else on_rank0(load_scorer, what, broadcast=False)
    run_dir = os.fspath(output_dir) if output_dir is not None else None
    try:
        record_settings: dict[str, Any] = {}
        if run_dir is not None:
            record_settings = on_rank0(lambda: run_settings(model, tokenizer, spec, sampling, name))
            prepare_run_dir(run_dir, record_settings, int(model.num_tokens))
        t0 = time.perf_counter()
        gen = _generate(model, tokenizer, spec, sampling, run_dir, progress, None, size)
        sample_seconds = time.perf_counter() - t0

        def finish() -> dict[str, Any]:
            files, source, old = {}, gen.images, {}
            if run_dir is not None:
                npz = os.path.basename(os.path.normpath(run_dir)) + ".npz"
                keys, names = ("images", "tokens", "npz", "grid", "metrics"), (IMAGES, TOKENS, npz)
                files = {k: os.path.join(run_dir, v) for k, v in zip(keys, names + (GRID, METRICS))}
                source = files["npz"]  # score exactly the pixels handed to the ADM evaluator
                write_npz(source, gen.image_paths, gen.image_size)
                grid = [read_png(p, gen.image_size) for p in gen.image_paths[:grid_images]]
                save_grid(files["grid"], grid)
                with contextlib.suppress(OSError, ValueError):
                    old = _read_json(files["metrics"])
            t1, got = time.perf_counter(), old  # not scored now: the earlier scores of these images
            if scorer is not None:
                kw = dict(batch_size=scoring.batch_size, device=device, progress=progress)
                got = M.compute_metrics(source, *scorer, **kw)
            scores = {k: got.get(k) for k in ("fid", "inception_score", "inception_score_std")}
            timed = gen.speed["timed_batches"] > 0
            kept = {} if timed else {k: old[k] for k in ("speed", "device") if k in old}
            record = {
                **scores,
                "num_images": gen.num_images,
                "image_size": list(gen.image_size),
                "settings": record_settings,
                "sampling": sampling.to_dict(),
                "seed": spec.seed,
                "eval_bsz": spec.eval_bsz,
                "speed": kept.get("speed", gen.speed),
                "generated_this_run": gen.generated,
                "found_on_disk": gen.skipped,
                "sampling_wall_s": sample_seconds,
                "metrics_wall_s": time.perf_counter() - t1 if scorer else old.get("metrics_wall_s"),
                "device": kept["device"] if "device" in kept else device_description(device),
                "dtype": "bfloat16 autocast" if sampling.bf16 else "float32",
                "world_size": gen.speed["processes"],
                "model_params": sum(p.numel() for p in model.parameters()),
                "ref_stats": ref_file,
                "versions": library_versions(),
                "files": files,
                **dict(info or {}),
            }
            if run_dir is not None:
                _write_json(files["metrics"], record, default=str)
            return record

        return on_rank0(finish, "after sampling (packing or scoring the images)")
    finally:
        if run_dir is not None and (fd := _HELD.pop(os.path.realpath(run_dir), None)) is not None:
            os.close(fd)
