"""The LPD training loop: the released recipe on one process, under DDP or FSDP2, resumable
bit-exactly (every random draw is a function of seed, epoch, step and rank; see docs/design.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn import Module
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from lpd import recipe
from lpd.config import check_positive, check_seed, derive_seed
from lpd.datasets import open_token_cache
from lpd.devices import available_cpus, warn_if_emulated_bf16
from lpd.distributed import DistInfo, init_distributed, on_rank0
from lpd.evaluate import RunSpec, Scoring, evaluate
from lpd.files import STATE_FILE, CheckpointError, atomic_write_bytes
from lpd.images import image_folder
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
from lpd.schedules import group_sizes, parse_group_sizes
from lpd.text.training import caption_batch, caption_training
from lpd.tokenizer import make_tokenizer

#: Exit status of ``main_train.py`` after saving on SIGTERM / SIGUSR1 (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75
Log = Callable[[str], None]
_EVAL_METRICS = ("fid", "inception_score", "inception_score_std", "sampling_wall_s")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN / inf; the run stopped before the update."""


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
    num_workers: int = field(default_factory=lambda: min(4, available_cpus()))
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
    fsdp: bool = False  # FSDP2 instead of DDP: weights, gradients and AdamW state sharded
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
    eval_group_sizes: str | None = None  # a schedule (released --group_sizes), over eval_steps
    eval_use_ema: bool = False
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(cfg=4.0)
    )  # bf16: --bf16
    eval_ref_stats: str | None = None
    overwrite: bool = False  # train into a folder holding another run's checkpoints

    def validate(self) -> None:
        if (schedule := self.lr_schedule) not in recipe.LR_SCHEDULES:
            raise ValueError(f"--lr_schedule {schedule!r}: choose one of {recipe.LR_SCHEDULES}")
        if self.use_cached and not self.cached_path:
            raise ValueError("--use_cached needs --cached_path (a cache written by main_cache.py)")
        if not self.use_cached and not self.data_path:
            raise ValueError(
                "give --data_path (an ImageFolder) or --use_cached --cached_path CACHE"
            )
        positive = ("epochs", "batch_size", "img_size", "save_last_freq", "log_freq", "eval_bsz")
        for name in (*positive, "eval_num_images", "eval_steps"):
            check_positive(getattr(self, name), f"--{name}")
        for name in ("num_workers", "save_every_steps", "save_every_epochs", "eval_freq"):
            if isinstance(v := getattr(self, name), bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name} must be an integer >= 0, got {v!r}")
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
        _architecture(self)  # an unknown preset, key or value

    def to_dict(self) -> dict[str, Any]:
        """The flags of this run (sampling settings flat, as ``--config`` takes them)."""
        d = dataclasses.asdict(self)
        sampling = d.pop("sampling")
        return {**d, **sampling, "bf16": d["bf16"]}  # evaluation follows training's --bf16


@dataclass
class TrainResult:
    """What :func:`train` ended with (``model`` is FSDP-sharded under ``fsdp``)."""

    model: Module
    epoch: int
    step: int
    global_step: int
    preempted: bool = False
    losses: list[float] = field(default_factory=list)
    ema: dict[str, torch.Tensor] | None = None


class _Logger:
    """``log.txt`` (JSON lines), TensorBoard and wandb, on rank 0 only."""

    def __init__(self, config: TrainConfig, info: DistInfo, log: Log) -> None:
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

                run = dict(project=config.wandb_project, name=config.run_name, resume="allow")
                self.wandb = wandb.init(**run, config=config.to_dict(), dir=config.output_dir)
            except ImportError:
                log("wandb logging skipped: wandb is not installed (`pip install wandb`)")

    def scalars(self, values: dict[str, float], global_step: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"global_step": global_step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"train/{k}", v, global_step)
        if self.wandb is not None:
            self.wandb.log(values, step=global_step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _architecture(config: TrainConfig) -> LPDConfig:
    """The model's configuration: the preset, ``model_config`` and the dropout flags."""
    dropouts = ("label_drop_prob", "attn_dropout", "proj_dropout")
    overrides = {
        **(config.model_config or {}),
        **{k: getattr(config, k) for k in dropouts if getattr(config, k) is not None},
    }
    overrides.pop("img_size", None)
    return LPDConfig.from_name(config.model, config.img_size, **overrides)


def build_model(config: TrainConfig, log: Log = print) -> LPD:
    """The model of ``config``, seeded or from ``--pretrained_ckpt`` (pos_embed interpolated)."""
    model = LPD(_architecture(config))
    seed = derive_seed(config.seed, recipe.Stream.INIT)
    model.initialize_weights(torch.Generator().manual_seed(seed))
    if config.pretrained_ckpt:
        source = f"--pretrained_ckpt {config.pretrained_ckpt!r}"
        hint = "is --model / model_config the architecture of the pretrained model?"
        fit_weights(model, read_weights(config.pretrained_ckpt)[1], source, hint, log)
        log(f"initialised from {config.pretrained_ckpt}")
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def _evaluate(
    config: TrainConfig, model: LPD, ema: EMA | None, tokenizer_fn: Callable, epoch: int, log: Log
) -> dict[str, float]:
    """Sample (and score, with ``eval_ref_stats``) at each :func:`eval_cfg_scales` into
    ``eval-epoch{E}[-ema]-cfg{s}``, guided at half the batch (as released); returns
    ``{"cfg{s}_{metric}": value}``. A failure is only logged."""
    if config.eval_group_sizes is None:
        sizes = group_sizes(config.img_size, config.eval_steps)
    else:
        sizes = parse_group_sizes(config.eval_group_sizes, model.num_tokens)
    sampling = config.sampling.replace(bf16=config.bf16)
    net = model
    if config.eval_use_ema or config.fsdp:  # a whole, plain copy (sharded modules do not decode)
        weights = full_tensors(ema.state if config.eval_use_ema else model.state_dict())
        with torch.device("meta"):
            net = LPD(model.config)
        net.load_state_dict(weights, assign=True)
    ref, results = config.eval_ref_stats, {}
    scoring = None if ref is None else Scoring(ref)
    net.eval()
    try:
        for scale in recipe.eval_cfg_scales(sampling.cfg):
            folder = f"eval-epoch{epoch}{'-ema' if config.eval_use_ema else ''}-cfg{scale:g}"
            bsz = config.eval_bsz if scale == 1.0 else max(1, config.eval_bsz // 2)
            spec = RunSpec(config.eval_num_images, sizes, seed=config.seed, eval_bsz=bsz)
            run = dict(output_dir=os.path.join(config.output_dir, folder), scoring=scoring)
            try:
                with torch.no_grad():
                    out = evaluate(net, tokenizer_fn(), spec, sampling.replace(cfg=scale), **run)
            except Exception as e:  # noqa: BLE001 - evaluation must not kill a long training run
                what = f"at epoch {epoch} (cfg {scale:g}) failed ({type(e).__name__}: {e})"
                log(f"evaluation {what}; training continues")
                continue
            for k in _EVAL_METRICS:
                if isinstance(v := out.get(k), (int, float)) and not isinstance(v, bool):
                    results[f"cfg{scale:g}_{k}"] = float(v)
    finally:
        net.train()
    return results


def _resume_path(config: TrainConfig) -> str | None:
    """The checkpoint to resume from, or None; refuses a folder of another run's checkpoints."""
    out, fsdp = config.output_dir, config.fsdp
    os.makedirs(out, exist_ok=True)
    resume = config.resume or (out if config.auto_resume and last_checkpoint(out, fsdp) else None)
    if not resume:
        found = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
        if found and not config.overwrite:
            raise CheckpointError(
                f"--output_dir {out!r} holds checkpoints of another run ({', '.join(found[:3])}); "
                f"continue it with --resume {out} (or --auto_resume), replace it with --overwrite, "
                f"or use another --output_dir"
            )
        return None
    path = resume
    if os.path.isdir(resume) and not os.path.isfile(os.path.join(resume, STATE_FILE)):  # run folder
        path = last_checkpoint(resume, fsdp) or last_checkpoint(resume, not fsdp)
    if path is None or not os.path.exists(path):
        nor = " (nor a checkpoint-last folder)" if path is None else ""
        where = path or os.path.join(resume, "checkpoint-last.pth")
        raise CheckpointError(f"--resume {resume!r}: no checkpoint at {where!r}{nor}")
    return path


def _check_classes(dataset: Any, config: TrainConfig, class_num: int) -> None:
    """Refuses labels outside ``0..class_num-1`` (the dataset's ``labels`` or ``classes``)."""
    known = getattr(dataset, "labels", None)
    known = np.asarray(known if known is not None else [])
    if known.size and int(known.min()) < 0:
        raise ValueError(
            f"the training set ({config.cached_path or 'dataset'}) has label "
            f"{int(known.min())}; labels are class indices 0..{class_num - 1}"
        )
    n = int(known.max()) + 1 if known.size else len(getattr(dataset, "classes", None) or ())
    if n > class_num:
        raise ValueError(
            f"the training set has {n} classes but the model only {class_num} "
            f"(model_config class_num)"
        )


def train(
    config: TrainConfig,
    info: DistInfo | None = None,
    dataset: Dataset | None = None,
    tokenizer: Module | None = None,
    log: Log = print,
) -> TrainResult:
    """Train (or resume) as ``config`` says; returns when done or after saving on a preemption
    signal. ``dataset`` replaces ``config``'s: items ``(tokens int [2, N] or [N], label)`` or
    ``(image [3, S, S] in [-1, 1], label)``; ``tokenizer`` encodes such images."""
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
    config: TrainConfig, info: DistInfo, dataset: Dataset | None, tokenizer: Module | None, log: Log
) -> TrainResult:
    device = info.device
    log = log if info.is_main else (lambda msg: None)
    if config.cpu_offload and device.type != "cuda":
        raise ValueError(
            "--cpu_offload keeps FSDP shards in CPU memory while a GPU computes; this run is on "
            f"{device}: drop it"
        )
    resume = _resume_path(config)
    model = build_model(config, log)
    N = model.num_tokens
    schedules = recipe.parse_schedule_list(config.group_sizes_list, config.img_size, N)
    if config.eval_group_sizes is not None:  # checked now, not at the first evaluation hours later
        try:
            parse_group_sizes(config.eval_group_sizes, N)
        except ValueError as e:
            raise ValueError(f"--group_sizes (the evaluation schedule): {e}") from e
    captioned, encoder = model.text is not None, None
    if captioned:
        dataset, encoder = caption_training(config, model, dataset, device)
    if dataset is None and config.use_cached:
        dataset = open_token_cache(config.cached_path, N, model.vocab_size, config.cache_format)
    elif dataset is None:
        dataset = image_folder(config.data_path, config.img_size)
    _check_classes(dataset, config, model.class_num)

    @functools.cache
    def make_tokenizer_once() -> Module:
        vq = (config.tokenizer, config.vqgan_path, config.vq_config, config.seed, device)
        return tokenizer if tokenizer is not None else make_tokenizer(*vq)

    train_model = distribute(model, info, config.fsdp, config.bf16, config.cpu_offload)
    global_batch = config.batch_size * info.world_size
    base_lr = float(config.lr) if config.lr is not None else config.blr * global_batch / 256.0
    groups = model.param_groups(config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=(0.9, 0.95))
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    rank, world, n_samples, batch = info.rank, info.world_size, len(dataset), config.batch_size
    epoch_batches = functools.partial(recipe.EpochBatchSampler, n_samples, batch, config.seed)
    steps_per_epoch = epoch_batches(0, rank, world).steps
    data_state = dict(world_size=world, batch_size=batch, num_samples=n_samples, seed=config.seed)
    meta = {"model_config": model.config.to_dict(), "args": config.to_dict()}
    meta.update(steps_per_epoch=steps_per_epoch, data_state=data_state)
    state = TrainState(model, optimizer, ema, info, config.fsdp, meta)
    start_epoch, start_step, global_step = state.resume(resume, log) if resume else (0, 0, 0)
    ema = state.ema  # a resumed EMA continues without --ema_decay
    model.train()
    if config.bf16:
        warn_if_emulated_bf16(device, torch.bfloat16)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    ddp = isinstance(train_model, torch.nn.parallel.DistributedDataParallel)
    if ddp and not train_model.find_unused_parameters:
        settle_ddp_buckets(train_model, config.batch_size, schedules[0], autocast)
    params = [p for p in model.parameters() if p.requires_grad]
    how = "FSDP" if config.fsdp else "DDP" if info.distributed else "one process"
    log(
        f"model: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {N} tokens per image, "
        f"{len(schedules)} group-size schedules, {how}{', EMA' if ema else ''}"
    )
    log(
        f"data: {n_samples} samples, {world} process(es) x batch {config.batch_size} = "
        f"{global_batch}, {steps_per_epoch} steps per epoch; lr {base_lr:.3g} "
        f"({config.lr_schedule}, warm-up {config.warmup_epochs} epochs)"
    )
    lr_recipe = dict(epochs=config.epochs, warmup_epochs=config.warmup_epochs, min_lr=config.min_lr)
    lr_recipe.update(schedule=config.lr_schedule, decay_start_epoch=config.lr_decay_start_epoch)
    logger = _Logger(config, info, log)
    stop = PreemptionFlag(config.preempt_signals)
    stop.install()
    if info.is_main:
        atomic_write_bytes(
            os.path.join(config.output_dir, "config.yaml"),
            lambda f: f.write(yaml.safe_dump(config.to_dict(), sort_keys=False).encode()),
        )

    workers = config.num_workers
    loading = dict(num_workers=workers, pin_memory=config.pin_mem and device.type == "cuda")
    loading.update(worker_init_fn=stop.worker_init if workers > 0 else None)
    bar_style = dict(disable=not info.is_main, dynamic_ncols=True)
    bar_style.update(mininterval=1.0 if os.isatty(2) else 30.0)

    def save(names: list[str]) -> None:
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
            step = start_step if epoch == start_epoch else 0
            sampler = epoch_batches(epoch, rank, world, step)
            if isinstance(dataset, torch.utils.data.IterableDataset):  # a stream of tar shards
                loader = dataset.loader(sampler, **loading)
            else:
                loader = DataLoader(dataset, batch_sampler=sampler, **loading)
            bar = tqdm(total=steps_per_epoch, initial=step, desc=f"epoch {epoch}", **bar_style)
            t_last, steps_since, first = time.perf_counter(), 0, len(losses)
            batches = stop.iterate(loader)
            for x, *cond in batches:
                draws = recipe.iteration_draws(config.seed, epoch, step, rank, len(x), N, schedules)
                text = {}
                if captioned:  # captions (text, mask); not flipped: words say left
                    x = x[:, 0] if x.dim() == 3 else x
                    text = dict(zip(("text", "cond_mask"), caption_batch(*cond, encoder, device)))
                tokens = recipe.batch_tokens(x, draws.flip, make_tokenizer_once, device)
                labels = None if text else cond[0].to(device, non_blocking=True).long()
                orders = draws.orders.to(device, non_blocking=True)
                torch.manual_seed(draws.dropout_seed)
                lr = recipe.lr_at(epoch + step / steps_per_epoch, base_lr, **lr_recipe)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = train_model(
                        tokens, labels, orders, draws.sizes, generator=draws.label_drop, **text
                    )
                # One collective per step: the mean loss and whether any rank was asked to stop.
                asked = torch.tensor(float(stop.requested), device=device)
                stats = torch.stack([loss.detach().float(), asked])
                if info.distributed:
                    dist.all_reduce(stats)
                    stats[0] /= world
                loss_value, stop_now = float(stats[0]), bool(stats[1] > 0)
                where = f"at epoch {epoch}, step {step} (global step {global_step})"
                where += "; stopped before the update"
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} {where}. The last good checkpoint is "
                        f"{last_checkpoint(config.output_dir, config.fsdp) or 'none'}; lower "
                        f"--blr / --lr, keep --grad_clip, or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                clip = config.grad_clip if config.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(params, clip)
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
                    values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm}
                    values.update(tokens_per_s=tok_s, epoch=epoch + step / steps_per_epoch)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "epoch"})
                    logger.scalars(values, global_step)
                if stop_now:
                    preempted = True
                    break
                every = config.save_every_steps
                if every > 0 and global_step % every == 0 and step < steps_per_epoch:
                    save(["checkpoint-last"])
            bar.close()
            within = preempted and step < steps_per_epoch
            last = within or due(config.save_last_freq) and last_saved != global_step
            names = ["checkpoint-last"] if last else []
            if due(config.save_every_epochs) and not within:
                names.append(f"checkpoint-{epoch}")
            if names:
                save(names)
            done = losses[first:]
            if not within:
                log(
                    f"epoch {epoch} done: mean loss {np.mean(done) if done else float('nan'):.4f} "
                    f"over {len(done)} steps, global step {global_step}"
                )
            if preempted:
                at = f"epoch {epoch}, step {step} (global step {global_step})"
                at = at if within else f"the end of epoch {epoch}"
                saved = last_checkpoint(config.output_dir, config.fsdp)
                log(f"preempted: saved {saved} at {at}; continue with --resume {config.output_dir}")
                break
            metrics = due(config.eval_freq) and _evaluate(
                config, model, ema, make_tokenizer_once, epoch, log
            )
            if metrics:
                log(f"evaluation at epoch {epoch}: {metrics}")
                logger.scalars({f"eval_{k}": v for k, v in metrics.items()}, global_step)
    finally:
        if batches is not None:
            batches.close()  # ends the DataLoader workers now, also after an error
        if bar is not None:
            bar.close()
        stop.restore()
        logger.close()
    return TrainResult(model, epoch, step, global_step, preempted, losses, ema and ema.state)
