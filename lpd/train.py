"""The LPD training loop: the released recipe on one process, under DDP or FSDP2, resumable bit-exactly
(every random draw is a function of seed, epoch, step and rank; see docs/design.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from lpd.config import derive_seed
from lpd.devices import available_cpus
from lpd.distributed import DistInfo, init_distributed, on_rank0
from lpd.files import STATE_FILE, CheckpointError, atomic_write_bytes
from lpd.models import LPD, LPDConfig, fit_weights, read_weights
from lpd.parallel import (
    EMA,
    PreemptionFlag,
    RunLock,
    TrainState,
    distribute,
    full_tensors,
    last_checkpoint,
    settle_ddp_buckets,
)
from lpd.sampling import SamplingConfig
from lpd.schedules import parse_group_sizes
from lpd.text.training import caption_batch, caption_training

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "PREEMPTED_EXIT_CODE",
    "LR_SCHEDULES",
    "lr_at",
    "train",
    "iteration_generator",
    "EpochBatchSampler",
    "random_orders",
    "parse_schedule_list",
    "build_model",
]

#: Exit status of ``main_train.py`` after saving on SIGTERM / SIGUSR1 (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75
LR_SCHEDULES = ("constant", "cosine", "constant+cosine")

# Purposes of the per-iteration random streams (part of the seed derivation; never renumber).
_PERM, _FLIP, _ORDER, _SCHEDULE, _LABEL_DROP, _DROPOUT, _INIT = range(7)


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN / inf; the run stopped before applying the update."""


@dataclass
class TrainConfig:
    """Everything :func:`train` reads; the fields are ``main_train.py``'s flags (released names)."""

    # model
    model: str = "lpd_l"
    img_size: int = 256
    model_config: dict | None = None
    label_drop_prob: float | None = None
    attn_dropout: float | None = None
    proj_dropout: float | None = None
    grad_checkpointing: bool = False
    # tokenizer (images encoded on the fly, evaluation)
    tokenizer: str = "vq"
    vqgan_path: str | None = None
    vq_config: dict | None = None
    # data
    use_cached: bool = False
    cached_path: str | None = None
    cache_format: str = "auto"
    data_path: str | None = None
    text_encoder: str = "wordllama"  # a text model streaming tar shards (a cache records its own)
    num_workers: int = field(default_factory=lambda: min(4, available_cpus()))  # loader processes
    pin_mem: bool = True
    # optimisation
    epochs: int = 450
    batch_size: int = 64
    blr: float = 1e-4
    lr: float | None = None
    min_lr: float = 1e-5
    lr_schedule: str = "constant+cosine"
    warmup_epochs: float = 50.0
    lr_decay_start_epoch: float = 400.0
    weight_decay: float = 0.02
    grad_clip: float = 3.0
    bf16: bool = False
    group_sizes_list: Any = None
    seed: int = 1
    device: str = "auto"
    fsdp: bool = False  # FSDP2 instead of DDP: parameters, gradients and AdamW state sharded over the processes
    cpu_offload: bool = False  # FSDP: keep the shards and AdamW state in CPU memory
    ema_decay: float | None = None  # None: as the resumed checkpoint (else none); 0: no EMA
    # checkpoints and logging
    output_dir: str = "output_dir"
    log_dir: str | None = None
    resume: str | None = None
    auto_resume: bool = False
    pretrained_ckpt: str | None = None
    save_every_steps: int = 1000
    save_every_epochs: int = 50
    save_last_freq: int = 1
    log_freq: int = 20
    wandb: bool = False
    wandb_project: str = "lpd"
    run_name: str | None = None
    preempt_signals: str = "TERM,USR1"
    # evaluation during training (lpd.evaluate at cfg 1.0 and at cfg, as the released loop)
    eval_freq: int = 0
    online_eval: bool = False  # the released flag; main_train.py turns it into an eval_freq
    eval_num_images: int = 1000
    eval_bsz: int = 64
    eval_steps: int = 20
    eval_group_sizes: str | None = (
        None  # an explicit schedule (released --group_sizes), overrides eval_steps
    )
    eval_use_ema: bool = False
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(cfg=4.0)
    )  # bf16 follows --bf16
    eval_ref_stats: str | None = None
    overwrite: bool = False  # train into a folder holding another run's checkpoints

    def validate(self) -> None:
        from lpd.config import check_seed

        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule {self.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        if self.use_cached and not self.cached_path:
            raise ValueError("--use_cached needs --cached_path (a cache written by main_cache.py)")
        if not self.use_cached and not self.data_path:
            raise ValueError(
                "give --data_path (an ImageFolder) or --use_cached --cached_path CACHE"
            )
        for names, low, what in (
            (
                (
                    "epochs",
                    "batch_size",
                    "img_size",
                    "save_last_freq",
                    "eval_num_images",
                    "eval_bsz",
                    "eval_steps",
                    "log_freq",
                ),
                1,
                "a positive integer",
            ),
            (
                ("num_workers", "save_every_steps", "save_every_epochs", "eval_freq"),
                0,
                "an integer >= 0",
            ),
        ):
            for name in names:
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, int) or v < low:
                    raise ValueError(f"--{name} must be {what}, got {v!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(
                f"--ema_decay must be in [0, 1) (0: no EMA; 0.9999 is usual), got {self.ema_decay}"
            )
        if self.eval_use_ema and not self.ema_decay:
            raise ValueError(
                "--eval_use_ema evaluates the EMA weights: give --ema_decay too (e.g. 0.9999)"
            )
        if self.cpu_offload and not self.fsdp:
            raise ValueError("--cpu_offload offloads FSDP shards: add --fsdp")
        check_seed(self.seed)
        from lpd.models import LPDConfig  # the architecture: unknown preset, key or value

        overrides = {k: v for k, v in (self.model_config or {}).items() if k != "img_size"}
        LPDConfig.from_name(self.model, self.img_size, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The flags of this run (sampling settings flat, as ``--config`` takes them)."""
        d = dataclasses.asdict(self)
        sampling = d.pop("sampling")
        sampling.pop("bf16")  # evaluation follows training's --bf16
        return {**d, **sampling}


@dataclass
class TrainResult:
    """What :func:`train` ended with (``model`` is FSDP-sharded under ``fsdp``)."""

    model: torch.nn.Module
    epoch: int
    step: int
    global_step: int
    preempted: bool = False
    losses: list[float] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None


def lr_at(
    epoch: float,
    base_lr: float,
    *,
    epochs: float,
    warmup_epochs: float = 0.0,
    schedule: str = "constant+cosine",
    min_lr: float = 0.0,
    decay_start_epoch: float | None = None,
) -> float:
    """The learning rate at fractional ``epoch``: linear warm-up to ``base_lr``, then ``constant``, or half a
    cosine to ``min_lr`` at ``epochs`` from the end of warm-up (``cosine``) or ``decay_start_epoch`` (``constant+cosine``)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    start = (
        warmup_epochs
        if schedule == "cosine" or decay_start_epoch is None
        else max(decay_start_epoch, warmup_epochs)
    )
    if schedule == "constant" or epoch < start:
        return base_lr
    if epochs <= start:
        return min_lr
    return min_lr + (base_lr - min_lr) * 0.5 * (
        1.0 + math.cos(math.pi * min(1.0, (epoch - start) / (epochs - start)))
    )


def iteration_generator(
    seed: int, purpose: int, epoch: int, step: int, rank: int = 0
) -> torch.Generator:
    """A CPU ``torch.Generator`` for one random stream of one iteration."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, epoch, step, rank))


def random_orders(batch: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, num_tokens]`` uniformly random permutations (argsort of float64 uniforms)."""
    return torch.rand(batch, num_tokens, generator=generator, dtype=torch.float64).argsort(dim=1)


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of one epoch, a function of ``(seed, epoch, rank, world_size)``: the permutation padded
    by wrapping, dealt round-robin (as ``DistributedSampler``), the last incomplete batch dropped, ``start_step`` skipped."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
    ) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size, self.start_step = (
            seed,
            epoch,
            rank,
            world_size,
            start_step,
        )
        self.per_rank = math.ceil(num_samples / world_size)
        self.steps = self.per_rank // batch_size
        if self.steps == 0:
            raise ValueError(
                f"{num_samples} samples over {world_size} process(es) give {self.per_rank} per process, fewer "
                f"than one batch of {batch_size}; lower --batch_size or add data"
            )

    def indices(self) -> list[int]:
        perm = torch.randperm(
            self.num_samples,
            generator=torch.Generator().manual_seed(derive_seed(self.seed, _PERM, self.epoch)),
        )
        pad = self.per_rank * self.world_size - self.num_samples
        if pad > 0:
            perm = torch.cat([perm, perm.repeat(math.ceil(pad / self.num_samples))[:pad]])
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        for s in range(self.start_step, self.steps):
            yield idx[s * self.batch_size : (s + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def parse_schedule_list(spec: Any, img_size: int, num_tokens: int) -> list[list[int]]:
    """The group-size schedules one iteration draws from: ``None`` (the released tables of the resolution),
    schedules separated by ``;`` (e.g. ``"[1]*256; [1*41, 2*46, 3*41]"``), a YAML file of a list of them, or such a list."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        from lpd import schedules

        try:
            return [list(s) for s in schedules.training_schedules(img_size)]
        except ValueError as e:
            raise ValueError(f"{e}; pass --group_sizes_list, e.g. '[1]*{num_tokens}'") from e
    if isinstance(spec, str) and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, list) or not loaded:
            raise ValueError(
                f"--group_sizes_list file {spec!r} must hold a non-empty YAML list of schedules"
            )
        spec = loaded
    if isinstance(spec, str):
        items: list[Any] = [s for s in spec.split(";") if s.strip()]
    elif isinstance(spec, (list, tuple)):  # a flat list of ints is one schedule
        items = [list(spec)] if all(isinstance(v, int) for v in spec) else list(spec)
    else:
        raise ValueError(f"--group_sizes_list: cannot read {spec!r}")
    return [parse_group_sizes(s, num_tokens) for s in items]


class _Logger:
    """``log.txt`` (JSON lines), TensorBoard and wandb, on rank 0 only."""

    def __init__(self, config: TrainConfig, info: DistInfo, log: Callable[[str], None]) -> None:
        self.enabled, self.tb, self.wandb = info.is_main, None, None
        self.path = os.path.join(config.output_dir, "log.txt")
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=config.log_dir or config.output_dir)
        except ImportError:
            log("TensorBoard logging skipped: `pip install tensorboard` to enable it")
        if config.wandb:
            try:
                import wandb

                self.wandb = wandb.init(
                    project=config.wandb_project,
                    name=config.run_name,
                    config=config.to_dict(),
                    dir=config.output_dir,
                    resume="allow",
                )
            except ImportError:
                log("wandb logging skipped: wandb is not installed (`pip install wandb`)")

    def scalars(self, values: dict[str, float], global_step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"global_step": global_step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, global_step)
        if self.wandb is not None:
            self.wandb.log(values, step=global_step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def build_model(config: TrainConfig, log: Callable[[str], None] = print) -> torch.nn.Module:
    """The model of ``config``: seeded initialisation, or ``--pretrained_ckpt`` (pos_embed interpolated)."""
    overrides = {
        **(config.model_config or {}),
        **{
            k: getattr(config, k)
            for k in ("label_drop_prob", "attn_dropout", "proj_dropout")
            if getattr(config, k) is not None
        },
    }
    overrides.pop("img_size", None)
    model = LPD(LPDConfig.from_name(config.model, config.img_size, **overrides))
    model.initialize_weights(torch.Generator().manual_seed(derive_seed(config.seed, _INIT)))
    if config.pretrained_ckpt:
        source = f"--pretrained_ckpt {config.pretrained_ckpt!r}"
        hint = "is --model / model_config the architecture of the pretrained model?"
        fit_weights(model, read_weights(config.pretrained_ckpt)[1], source, hint, log)
        log(f"initialised from {config.pretrained_ckpt}")
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def _batch_tokens(
    x: torch.Tensor,
    flip_gen: torch.Generator,
    get_tokenizer: Callable[[], torch.nn.Module],
    device: torch.device,
) -> torch.Tensor:
    """Raster tokens ``[B, N]`` of a batch: the flipped variant with probability 0.5."""
    B = x.shape[0]
    flip = torch.rand(B, generator=flip_gen) < 0.5
    if not torch.is_floating_point(x):  # token cache: [B, 2, N] (original, flipped) or [B, N]
        if x.dim() == 3:
            x = x[torch.arange(B), flip.long()]
        return x.to(device, non_blocking=True).long()
    x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device, non_blocking=True)
    with torch.no_grad():
        return get_tokenizer().encode(x).reshape(B, -1).long()


_EVAL_METRICS = ("fid", "inception_score", "inception_score_std", "sampling_wall_s")


def eval_cfg_scales(cfg: float) -> list[float]:
    """The guidance scales of an evaluation during training: 1.0, then ``cfg`` unless it is 0 or 1 (as released)."""
    return [1.0] if cfg in (0.0, 1.0) else [1.0, float(cfg)]


def _evaluate(
    config: TrainConfig,
    model: torch.nn.Module,
    ema: EMA | None,
    tokenizer_fn: Callable[[], Any],
    epoch: int,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Sample (and score, with ``eval_ref_stats``) at each :func:`eval_cfg_scales` into ``eval-epoch{E}[-ema]-cfg{s}``,
    guided at half the batch (as released); returns ``{"cfg{s}_{metric}": value}``. A failure is only logged."""
    from lpd.evaluate import RunSpec, Scoring, evaluate
    from lpd.models import LPD
    from lpd.schedules import group_sizes

    sizes = (
        parse_group_sizes(config.eval_group_sizes, model.num_tokens)
        if config.eval_group_sizes is not None
        else group_sizes(config.img_size, config.eval_steps)
    )
    sampling = config.sampling.replace(bf16=config.bf16)
    net = model
    if config.eval_use_ema or config.fsdp:  # a whole, plain copy (sharded modules do not decode)
        weights = full_tensors(ema.state if config.eval_use_ema else model.state_dict())
        with torch.device("meta"):
            net = LPD(model.config)
        net.load_state_dict(weights, assign=True)
    results: dict[str, float] = {}
    net.eval()
    try:
        for scale in eval_cfg_scales(sampling.cfg):
            folder = f"eval-epoch{epoch}{'-ema' if config.eval_use_ema else ''}-cfg{scale:g}"
            try:
                with torch.no_grad():
                    bsz = config.eval_bsz if scale == 1.0 else max(1, config.eval_bsz // 2)
                    spec = RunSpec(config.eval_num_images, sizes, seed=config.seed, eval_bsz=bsz)
                    ref = config.eval_ref_stats
                    out = evaluate(
                        net,
                        tokenizer_fn(),
                        spec,
                        sampling.replace(cfg=scale),
                        output_dir=os.path.join(config.output_dir, folder),
                        scoring=None if ref is None else Scoring(ref),
                    )
            except Exception as e:  # noqa: BLE001 - evaluation must not kill a long training run
                log(
                    f"evaluation at epoch {epoch} (cfg {scale:g}) failed ({type(e).__name__}: {e}); training continues"
                )
                continue
            results.update(
                {
                    f"cfg{scale:g}_{k}": float(out[k])
                    for k in _EVAL_METRICS
                    if isinstance(out.get(k), (int, float)) and not isinstance(out.get(k), bool)
                }
            )
    finally:
        net.train()
    return results


def _resume_path(config: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None; refuses a folder holding another run's checkpoints."""
    os.makedirs(config.output_dir, exist_ok=True)
    resume = config.resume or (
        config.output_dir
        if config.auto_resume and last_checkpoint(config.output_dir, config.fsdp)
        else None
    )
    if not resume:
        found = sorted(n for n in os.listdir(config.output_dir) if n.startswith("checkpoint-"))
        if found and not config.overwrite:
            raise CheckpointError(
                f"--output_dir {config.output_dir!r} holds checkpoints of another run ({', '.join(found[:3])}); continue it "
                f"with --resume {config.output_dir} (or --auto_resume), replace it with --overwrite, or use another --output_dir"
            )
        return None
    path = resume
    if os.path.isdir(resume) and not os.path.isfile(
        os.path.join(resume, STATE_FILE)
    ):  # a run folder
        path = last_checkpoint(resume, config.fsdp) or last_checkpoint(resume, not config.fsdp)
    if path is None or not os.path.exists(path):
        raise CheckpointError(
            f"--resume {resume!r}: no checkpoint at {path or os.path.join(resume, 'checkpoint-last.pth')!r}"
            f"{' (nor a checkpoint-last folder)' if path is None else ''}"
        )
    return path


def train(
    config: TrainConfig,
    info: DistInfo | None = None,
    dataset: torch.utils.data.Dataset | None = None,
    tokenizer: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) as ``config`` says; returns when done or after saving on a preemption signal.
    ``dataset`` replaces ``config``'s: items ``(tokens int [2, N] or [N], label)`` or ``(image [3, S, S] in [-1, 1],
    label)``; ``tokenizer`` encodes such images."""
    if dataset is None:
        config.validate()
    info = info or init_distributed(config.device)
    lock = on_rank0(lambda: RunLock(config.output_dir), "taking --output_dir", broadcast=False)
    try:
        return _run(config, info, dataset, tokenizer, log)
    finally:
        if lock is not None:
            lock.release()


def _run(
    config: TrainConfig,
    info: DistInfo,
    dataset: torch.utils.data.Dataset | None,
    tokenizer: torch.nn.Module | None,
    log: Callable[[str], None],
) -> TrainResult:
    device = info.device
    log = log if info.is_main else (lambda msg: None)
    if config.cpu_offload and device.type != "cuda":
        raise ValueError(
            f"--cpu_offload keeps FSDP shards in CPU memory while a GPU computes; this run is on {device}: drop it"
        )
    resume = _resume_path(config)
    model = build_model(config, log)
    N = model.num_tokens
    schedules = parse_schedule_list(config.group_sizes_list, config.img_size, N)
    if config.eval_group_sizes is not None:  # checked now, not at the first evaluation hours later
        try:
            parse_group_sizes(config.eval_group_sizes, N)
        except ValueError as e:
            raise ValueError(f"--group_sizes (the evaluation schedule): {e}") from e
    encoder = None
    if model.text is not None:
        dataset, encoder = caption_training(config, model, dataset, device)
    if dataset is None:
        from lpd import datasets

        dataset = (
            datasets.open_token_cache(config.cached_path, N, model.vocab_size, config.cache_format)
            if config.use_cached
            else datasets.image_folder(config.data_path, config.img_size)
        )
    known, classes = getattr(dataset, "labels", None), getattr(dataset, "classes", None)
    n_classes = (
        int(np.max(np.asarray(known))) + 1
        if known is not None and len(known)
        else len(classes)
        if classes
        else None
    )
    if known is not None and len(known) and int(np.min(known)) < 0:
        raise ValueError(
            f"the training set ({config.cached_path or 'dataset'}) has label "
            f"{int(np.min(known))}; labels are class indices 0..{model.class_num - 1}"
        )
    if n_classes is not None and n_classes > model.class_num:
        raise ValueError(
            f"the training set has {n_classes} classes but the model only {model.class_num} (model_config class_num)"
        )

    @functools.cache
    def make_tokenizer_once() -> torch.nn.Module:
        from lpd.tokenizer import make_tokenizer

        return (
            tokenizer
            if tokenizer is not None
            else make_tokenizer(
                config.tokenizer, config.vqgan_path, config.vq_config, config.seed, device
            )
        )

    train_model = distribute(model, info, config.fsdp, config.bf16, config.cpu_offload)
    global_batch = config.batch_size * info.world_size
    base_lr = float(config.lr) if config.lr is not None else config.blr * global_batch / 256.0
    optimizer = torch.optim.AdamW(
        model.param_groups(config.weight_decay), lr=base_lr, betas=(0.9, 0.95)
    )
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    steps_per_epoch = EpochBatchSampler(
        len(dataset), config.batch_size, config.seed, 0, info.rank, info.world_size
    ).steps
    state = TrainState(
        model,
        optimizer,
        ema,
        info,
        config.fsdp,
        {
            "model_config": model.config.to_dict(),
            "args": config.to_dict(),
            "steps_per_epoch": steps_per_epoch,
            "data_state": {
                "world_size": info.world_size,
                "batch_size": config.batch_size,
                "num_samples": len(dataset),
                "seed": config.seed,
            },
        },
    )
    start_epoch, start_step, global_step = state.resume(resume, log) if resume else (0, 0, 0)
    ema = state.ema  # a resumed EMA continues without --ema_decay
    model.train()
    if config.bf16:
        from lpd.sampling import warn_if_emulated_bf16

        warn_if_emulated_bf16(device, torch.bfloat16)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    if (
        isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
        and not train_model.find_unused_parameters
    ):
        settle_ddp_buckets(train_model, config.batch_size, schedules[0], autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    log(
        f"model: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {N} tokens per image, {len(schedules)} group-size "
        f"schedules, {'FSDP' if config.fsdp else 'DDP' if info.distributed else 'one process'}{', EMA' if ema else ''}"
    )
    log(
        f"data: {len(dataset)} samples, {info.world_size} process(es) x batch {config.batch_size} = {global_batch}, "
        f"{steps_per_epoch} steps per epoch; lr {base_lr:.3g} ({config.lr_schedule}, warm-up {config.warmup_epochs} epochs)"
    )
    logger = _Logger(config, info, log)
    stop = PreemptionFlag(config.preempt_signals)
    stop.install()
    if info.is_main:
        atomic_write_bytes(
            os.path.join(config.output_dir, "config.yaml"),
            lambda f: f.write(yaml.safe_dump(config.to_dict(), sort_keys=False).encode()),
        )

    def save(names: Sequence[str]) -> None:
        nonlocal last_saved
        state.save([os.path.join(config.output_dir, n) for n in names], epoch, step, global_step)
        last_saved = global_step

    def due(every: int) -> bool:
        return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == config.epochs)

    losses: list[float] = []
    preempted, last_saved = False, global_step if resume else -1
    epoch, step, batches, bar = start_epoch, start_step, None, None
    try:
        for epoch in range(start_epoch, config.epochs):
            if hasattr(dataset, "set_epoch"):  # one of an image's captions per epoch
                dataset.set_epoch(epoch)
            sampler = EpochBatchSampler(
                len(dataset),
                config.batch_size,
                config.seed,
                epoch,
                info.rank,
                info.world_size,
                start_step if epoch == start_epoch else 0,
            )
            kw = dict(pin_memory=config.pin_mem and device.type == "cuda")
            kw["worker_init_fn"] = stop.worker_init if config.num_workers > 0 else None
            loader = (
                dataset.loader(sampler, config.num_workers, **kw)  # a stream (lpd.text.data)
                if isinstance(dataset, torch.utils.data.IterableDataset)
                else torch.utils.data.DataLoader(
                    dataset, batch_sampler=sampler, num_workers=config.num_workers, **kw
                )
            )
            bar = tqdm(
                total=steps_per_epoch,
                initial=sampler.start_step,
                desc=f"epoch {epoch}",
                disable=not info.is_main,
                dynamic_ncols=True,
                mininterval=1.0 if os.isatty(2) else 30.0,
            )
            t_last, steps_since, first = time.perf_counter(), 0, len(losses)
            step = sampler.start_step
            batches = stop.iterate(loader)
            for x, *cond in batches:

                def gen(purpose: int) -> torch.Generator:
                    return iteration_generator(config.seed, purpose, epoch, step, info.rank)

                text = {}
                if model.text is not None:  # captions (text, mask); not flipped: words say left
                    x, text = x[:, 0] if x.dim() == 3 else x, caption_batch(*cond, encoder, device)
                    text = dict(zip(("text", "cond_mask"), text))
                tokens = _batch_tokens(x, gen(_FLIP), make_tokenizer_once, device)
                labels = None if text else cond[0].to(device, non_blocking=True).long()
                orders = random_orders(tokens.shape[0], N, gen(_ORDER)).to(
                    device, non_blocking=True
                )
                sizes = schedules[
                    int(torch.randint(len(schedules), (1,), generator=gen(_SCHEDULE)))
                ]  # per rank, as released
                torch.manual_seed(
                    derive_seed(config.seed, _DROPOUT, epoch, step, info.rank)
                )  # dropout
                lr = lr_at(
                    epoch + step / steps_per_epoch,
                    base_lr,
                    epochs=config.epochs,
                    warmup_epochs=config.warmup_epochs,
                    schedule=config.lr_schedule,
                    min_lr=config.min_lr,
                    decay_start_epoch=config.lr_decay_start_epoch,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = train_model(
                        tokens, labels, orders, sizes, generator=gen(_LABEL_DROP), **text
                    )
                # One collective per step: the mean loss and whether any rank was asked to stop.
                stats = torch.stack(
                    [loss.detach().float(), torch.tensor(float(stop.requested), device=device)]
                )
                if info.distributed:
                    dist.all_reduce(stats)
                    stats[0] /= info.world_size
                loss_value, stop_now = float(stats[0]), bool(stats[1] > 0)
                where = f"at epoch {epoch}, step {step} (global step {global_step}); stopped before the update"
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} {where}. The last good checkpoint is "
                        f"{last_checkpoint(config.output_dir, config.fsdp) or 'none'}; lower --blr / --lr, "
                        f"keep --grad_clip, or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(
                    params, config.grad_clip if config.grad_clip > 0 else float("inf")
                )
                grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"gradient norm is {grad_norm} {where}; the last good checkpoint is kept"
                    )
                optimizer.step()
                if ema is not None:
                    ema.update()
                step, global_step, steps_since = step + 1, global_step + 1, steps_since + 1
                losses.append(loss_value)
                bar.update(1)
                if info.is_main and (global_step % config.log_freq == 0 or step == steps_per_epoch):
                    now = time.perf_counter()
                    tok_s = steps_since * global_batch * N / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        lr=f"{lr:.3g}",
                        gnorm=f"{grad_norm:.3g}",
                        tok_s=f"{tok_s:.3g}",
                    )
                    logger.scalars(
                        {
                            "loss": loss_value,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tok_s,
                            "epoch": epoch + step / steps_per_epoch,
                        },
                        global_step,
                    )
                if stop_now:
                    preempted = True
                    break
                if (
                    config.save_every_steps > 0
                    and global_step % config.save_every_steps == 0
                    and step < steps_per_epoch
                ):
                    save(["checkpoint-last"])
            bar.close()
            hint = f"continue with --resume {config.output_dir}"
            if preempted and step < steps_per_epoch:
                save(["checkpoint-last"])
                log(
                    f"preempted: saved {last_checkpoint(config.output_dir, config.fsdp)} at epoch {epoch}, step {step} "
                    f"(global step {global_step}); {hint}"
                )
                break
            names = (
                ["checkpoint-last"]
                if due(config.save_last_freq) and last_saved != global_step
                else []
            )
            if due(config.save_every_epochs):
                names.append(f"checkpoint-{epoch}")
            if names:
                save(names)
            done = losses[first:]
            log(
                f"epoch {epoch} done: mean loss {np.mean(done) if done else float('nan'):.4f} over "
                f"{len(done)} steps, global step {global_step}"
            )
            if preempted:
                log(
                    f"preempted: saved {last_checkpoint(config.output_dir, config.fsdp)} at the end of epoch {epoch}; {hint}"
                )
                break
            if due(config.eval_freq):
                metrics = _evaluate(config, model, ema, make_tokenizer_once, epoch, log)
                if metrics:
                    log(f"evaluation at epoch {epoch}: {metrics}")
                    logger.scalars(
                        {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                        global_step,
                    )
    finally:
        if batches is not None:
            batches.close()  # ends the DataLoader workers now, also after an error
        if bar is not None:
            bar.close()
        stop.restore()
        logger.close()
    return TrainResult(
        model=model,
        epoch=epoch,
        step=step,
        global_step=global_step,
        preempted=preempted,
        losses=losses,
        ema=ema.state if ema is not None else None,
    )
