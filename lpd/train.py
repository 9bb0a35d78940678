"""The LPD training loop: the released recipe, DDP, and checkpoints that survive preemption.

:func:`train` runs the recipe of spec sections 2 and 6 on one process or under DDP (nccl on CUDA,
gloo on the CPU): uniformly random orders per sample, group sizes per iteration drawn uniformly
from the resolution's schedule list, label dropout, AdamW (0.9, 0.95) over
:meth:`lpd.models.LPD.param_groups`, ``lr = blr * global_batch / 256`` with warm-up and the
``constant`` / ``cosine`` / ``constant+cosine`` schedules (:mod:`lpd.lr_sched`), gradient
clipping, bf16 autocast and gradient checkpointing.  Data are token caches
(:mod:`lpd.datasets`, both layouts) or images encoded on the fly by the VQ tokenizer.

**Exact resume.**  Nothing random depends on state that evolves across iterations: the data
permutation of an epoch is a function of ``(seed, epoch)``; the flips, orders, label dropout and
dropout and group-size schedule of an iteration of ``(seed, epoch, step, rank)`` (each rank
draws its own schedule, as the released loop).  A checkpoint records the epoch and the number
of steps done in it; ``--resume`` skips those steps and continues with bit-identical updates
(same world size and batch size).

**Checkpoints.**  ``checkpoint-last.pth`` every ``save_every_steps`` steps, at every epoch end,
and when SIGTERM / SIGUSR1 arrives (the handler only sets a flag; all ranks agree at the next step
boundary, rank 0 saves, and :func:`train` returns with ``preempted=True``; ``main_train.py``
then exits with :data:`PREEMPTED_EXIT_CODE`).  ``checkpoint-{epoch}.pth`` (0-based index of the
finished epoch) every ``save_every_epochs`` epochs.  Files are written atomically
(:func:`lpd.checkpoint.save_checkpoint`) and hold ``model`` (the plain state dict of the
released format), ``model_config``, ``optimizer``, ``scaler``, ``epoch`` (the epoch in progress),
``step`` (steps done in it), ``global_step``, ``args`` (a plain dict), ``rng`` (python, numpy,
torch and CUDA states of every rank) and ``data_state``.  A non-finite loss or gradient norm
stops the run with :class:`NonFiniteLossError` before the update, leaving the last good
checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml

from lpd.checkpoint import (
    CheckpointError,
    check_finite,
    interpolate_pos_embed,
    load_checkpoint,
    load_into,
    load_state_dict,
    save_checkpoint,
)
from lpd.distributed import DistInfo, barrier, gather_object, init_distributed
from lpd.lr_sched import LR_SCHEDULES, base_learning_rate, lr_at
from lpd.sampling import SamplingConfig, derive_seed
from lpd.schedules import parse_group_sizes

__all__ = [
    "TrainConfig",
    "TrainResult",
    "NonFiniteLossError",
    "PREEMPTED_EXIT_CODE",
    "train",
    "iteration_generator",
    "EpochBatchSampler",
    "random_orders",
    "parse_schedule_list",
    "resolve_resume_path",
]

#: Exit status of ``main_train.py`` after saving on SIGTERM / SIGUSR1 (EX_TEMPFAIL: "try again").
PREEMPTED_EXIT_CODE = 75

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
    num_workers: int = 4
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
    eval_group_sizes: str | None = None  # an explicit schedule (released --group_sizes), overrides eval_steps
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(cfg=4.0))  # bf16 follows --bf16
    eval_ref_stats: str | None = None
    overwrite: bool = False  # train into a folder holding another run's checkpoints

    def validate(self) -> None:
        from lpd.config import check_seed

        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr_schedule {self.lr_schedule!r}: choose one of {LR_SCHEDULES}")
        if self.use_cached and not self.cached_path:
            raise ValueError("--use_cached needs --cached_path (a cache written by main_cache.py)")
        if not self.use_cached and not self.data_path:
            raise ValueError("give --data_path (an ImageFolder) or --use_cached --cached_path CACHE")
        for name in ("epochs", "batch_size", "img_size", "save_last_freq", "eval_num_images", "eval_bsz", "eval_steps", "log_freq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"--{name} must be a positive integer, got {v!r}")
        for name in ("num_workers", "save_every_steps", "save_every_epochs", "eval_freq"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name} must be an integer >= 0, got {v!r}")
        check_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """The flags of this run (sampling settings flat, as ``--config`` takes them)."""
        d = dataclasses.asdict(self)
        sampling = d.pop("sampling")
        sampling.pop("bf16")  # evaluation follows training's --bf16
        return {**d, **sampling}


@dataclass
class TrainResult:
    """What :func:`train` ended with."""

    model: torch.nn.Module
    epoch: int
    step: int
    global_step: int
    preempted: bool = False
    losses: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Deterministic randomness
# ---------------------------------------------------------------------------------------------


def iteration_generator(seed: int, purpose: int, epoch: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` for one random stream of one iteration."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, epoch, step, rank))


def random_orders(batch: int, num_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, num_tokens]`` uniformly random permutations (argsort of float64 uniforms)."""
    return torch.rand(batch, num_tokens, generator=generator, dtype=torch.float64).argsort(dim=1)


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of one epoch, a pure function of ``(seed, epoch, rank, world_size)``.

    The epoch's permutation of all samples is padded (by wrapping) to a multiple of the world size
    and dealt round-robin, as ``DistributedSampler``; the last incomplete batch is dropped.
    ``start_step`` skips batches that a resumed run already did.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                 world_size: int = 1, start_step: int = 0) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.steps = self.per_rank // batch_size
        if self.steps == 0:
            raise ValueError(
                f"{num_samples} samples over {world_size} process(es) give {self.per_rank} per process, fewer "
                f"than one batch of {batch_size}; lower --batch_size or add data"
            )
        self.start_step = start_step

    def indices(self) -> list[int]:
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(derive_seed(self.seed, _PERM, self.epoch)))
        total = self.per_rank * self.world_size
        if total > self.num_samples:
            perm = torch.cat([perm, perm[: total - self.num_samples].repeat(math.ceil((total - self.num_samples) / self.num_samples))[: total - self.num_samples]])
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        idx = self.indices()
        for s in range(self.start_step, self.steps):
            yield idx[s * self.batch_size : (s + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def parse_schedule_list(spec: Any, img_size: int, num_tokens: int) -> list[list[int]]:
    """The group-size schedules one iteration draws from.

    ``None``: the released tables of the resolution (:func:`lpd.schedules.training_schedules`).
    A string: schedules separated by ``;`` (each in any form :func:`lpd.schedules.parse_group_sizes`
    reads, e.g. ``"[1]*256; [1*41, 2*46, 3*41]"``), or the path of a YAML file holding a list of
    schedules.  A list (from a YAML config): each entry a list of ints or such a string.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        from lpd import schedules

        try:
            return [list(s) for s in schedules.training_schedules(img_size)]
        except ValueError as e:
            raise ValueError(f"{e}; pass --group_sizes_list, e.g. '[1]*{num_tokens}'") from e
    if isinstance(spec, str) and os.path.isfile(spec):
        with open(spec, "r", encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, list) or not loaded:
            raise ValueError(f"--group_sizes_list file {spec!r} must hold a non-empty YAML list of schedules")
        spec = loaded
    if isinstance(spec, str):
        items: list[Any] = [s for s in spec.split(";") if s.strip()]
    elif isinstance(spec, (list, tuple)):
        # A single schedule given as a flat list of ints is one schedule, not many.
        items = [list(spec)] if all(isinstance(v, int) for v in spec) else list(spec)
    else:
        raise ValueError(f"--group_sizes_list: cannot read {spec!r}")
    return [parse_group_sizes(s, num_tokens) for s in items]


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


def _ignore_signals(signals: tuple[int, ...], worker_id: int) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def _iterate_shielded(loader: torch.utils.data.DataLoader, signals: Sequence[int]):
    """``iter(loader)`` with the preemption signals blocked while its workers are forked.

    Forked workers inherit the blocked mask (and ``worker_init_fn`` then ignores the signals), so a
    SIGTERM that the launcher sends to the whole process group can never kill a worker, not even one
    that is still starting; the main process receives any signal held back here as soon as the
    mask is restored.
    """
    if not signals or loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (or :meth:`request`); the loop saves and stops at the next step boundary."""

    def __init__(self, names: str) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._signals = []
        for name in filter(None, (n.strip().upper() for n in names.split(","))):
            sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
            if sig is None:
                raise ValueError(f"--preempt_signals: unknown signal {name!r}")
            self._signals.append(sig)

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.requested:
            os.write(2, f"[lpd.train] received {signal.Signals(signum).name}: saving checkpoint-last.pth at the next step boundary, then exiting\n".encode())
        self.requested, self.signum = True, signum

    def request(self) -> None:
        self.requested = True

    def install(self) -> None:
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                warnings.warn("train() is not running in the main thread: preemption signals are not handled")
                return

    @property
    def signals(self) -> list[int]:
        return list(self._signals)

    @property
    def worker_init(self) -> Callable[[int], None]:
        """``worker_init_fn`` for DataLoader workers: they ignore the preemption signals.  The launcher
        (torchrun, Slurm) sends them to the whole process group, and a worker killed by one would make
        the main process fail before it can save; the main process stops at the next step instead and
        shuts the workers down.  (A picklable partial, so it also works with the spawn start method.)"""
        return functools.partial(_ignore_signals, tuple(int(s) for s in self._signals))

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()


# ---------------------------------------------------------------------------------------------
# Checkpoint state
# ---------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any] | None, path: str,
                    log: Callable[[str], None]) -> None:
    """Load AdamW's state when it was written for the same parameter groups; else warn and start fresh.

    (The released code orders its decay / no-decay groups differently: its moments cannot be mapped.)
    """
    if not state:
        log(f"warning: {path} has no optimizer state; AdamW starts fresh")
        return
    ours = [len(g["params"]) for g in optimizer.param_groups]
    theirs = [len(g.get("params", [])) for g in state.get("param_groups", [])]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shapes_ok = ours == theirs and all(
        int(i) < len(params) and all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == params[int(i)].shape
                                     for v in st.values())
        for i, st in state.get("state", {}).items())
    if not shapes_ok:
        log(f"warning: the optimizer state in {path} does not match this model's parameter groups "
            f"({theirs} vs {ours} parameters); AdamW starts fresh")
        return
    optimizer.load_state_dict(state)


def resolve_resume_path(resume: str) -> str:
    """``--resume`` may name a checkpoint file or an output folder holding ``checkpoint-last.pth``."""
    path = os.path.join(resume, "checkpoint-last.pth") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {resume!r}: no checkpoint at {path!r}")
    return path


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class _Logger:
    """stdout (tqdm bar + lines), ``log.txt`` (JSON lines), TensorBoard and wandb, on rank 0 only."""

    def __init__(self, config: TrainConfig, info: DistInfo, log: Callable[[str], None]) -> None:
        self.enabled = info.is_main
        self.log = log if info.is_main else (lambda msg: None)
        self.tb = None
        self.wandb = None
        self.path = os.path.join(config.output_dir, "log.txt")
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=config.log_dir or config.output_dir)
        except ImportError:
            self.log("TensorBoard logging skipped: `pip install tensorboard` to enable it")
        if config.wandb:
            try:
                import wandb

                self.wandb = wandb.init(project=config.wandb_project, name=config.run_name, config=config.to_dict(),
                                        dir=config.output_dir, resume="allow")
            except ImportError:
                self.log("wandb logging skipped: wandb is not installed (`pip install wandb`)")

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


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def _model_overrides(config: TrainConfig) -> dict[str, Any]:
    overrides = dict(config.model_config or {})
    for name in ("label_drop_prob", "attn_dropout", "proj_dropout"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    overrides.pop("img_size", None)
    return overrides


def build_model(config: TrainConfig, log: Callable[[str], None] = print) -> torch.nn.Module:
    """The model of ``config``: seeded initialisation, or ``--pretrained_ckpt`` (pos_embed interpolated)."""
    from lpd.models import LPD, LPDConfig

    model = LPD(LPDConfig.from_name(config.model, config.img_size, **_model_overrides(config)))
    model.initialize_weights(torch.Generator().manual_seed(derive_seed(config.seed, _INIT)))
    if config.pretrained_ckpt:
        sd = load_state_dict(config.pretrained_ckpt)
        check_finite(sd, f"--pretrained_ckpt {config.pretrained_ckpt!r}")
        if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
            old = sd["pos_embed"].shape[1] - 1
            sd = dict(sd)
            sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], model.num_tokens)
            log(f"pretrained {config.pretrained_ckpt}: pos_embed interpolated from {old} to {model.num_tokens} positions")
        load_into(model, sd, source=f"--pretrained_ckpt {config.pretrained_ckpt!r}",
                  hint="is --model / model_config the architecture of the pretrained model?")
        log(f"initialised from {config.pretrained_ckpt}")
    model.set_grad_checkpointing(config.grad_checkpointing)
    return model


def build_dataset(config: TrainConfig, num_tokens: int, vocab_size: int):
    """The training set: a token cache (``--use_cached``) or an ImageFolder with the ADM crop."""
    from lpd import datasets

    if config.use_cached:
        return datasets.open_token_cache(config.cached_path, num_tokens, vocab_size, config.cache_format)
    return datasets.image_folder(config.data_path, config.img_size)


def _num_classes(dataset) -> int | None:
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels):
        return int(np.max(np.asarray(labels))) + 1
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else None


def _batch_tokens(x: torch.Tensor, flip_gen: torch.Generator, get_tokenizer: Callable[[], torch.nn.Module],
                  device: torch.device) -> torch.Tensor:
    """Raster tokens ``[B, N]`` of a batch: pick the flipped variant with probability 0.5."""
    B = x.shape[0]
    flip = torch.rand(B, generator=flip_gen) < 0.5
    if not torch.is_floating_point(x):  # token cache: [B, 2, N] (original, flipped) or [B, N]
        if x.dim() == 3:
            x = x[torch.arange(B), flip.long()]
        return x.to(device, non_blocking=True).long()
    x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device, non_blocking=True)
    with torch.no_grad():
        return get_tokenizer().encode(x).reshape(B, -1).long()


def _settle_ddp_buckets(ddp_model: torch.nn.Module, model: torch.nn.Module, batch: int, sizes: Sequence[int],
                        device: torch.device, autocast: Any) -> None:
    """One throw-away forward/backward so that DDP rebuilds its gradient buckets before the first real step.

    DDP re-buckets gradients after its first backward pass (in the order they became ready).  With
    more than two processes the summation order of the all-reduce depends on the bucket layout, so
    a resumed process whose first step used the initial buckets would differ in the last bits from
    the uninterrupted run.  Doing this in every (re)started process makes every real step use the
    rebuilt layout.  The weights and the optimizer are untouched; randomness is reseeded per step.
    """
    N = model.num_tokens
    tokens = torch.zeros(batch, N, dtype=torch.long, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    orders = torch.arange(N, device=device).expand(batch, N)
    with autocast:
        loss = ddp_model(tokens, labels, orders, sizes)
    loss.backward()
    model.zero_grad(set_to_none=True)


_EVAL_METRICS = ("fid", "inception_score", "inception_score_std", "sampling_wall_s")


def eval_cfg_scales(cfg: float) -> list[float]:
    """The guidance scales an evaluation during training runs: 1.0, then ``cfg`` unless it is 0 or 1
    (as the released training loop does)."""
    return [1.0] if cfg in (0.0, 1.0) else [1.0, float(cfg)]


def _evaluate(config: TrainConfig, model: torch.nn.Module, tokenizer_fn: Callable[[], Any], epoch: int,
              info: DistInfo, log: Callable[[str], None]) -> dict[str, float]:
    """Sample ``eval_num_images`` images (FID / IS too with ``eval_ref_stats``) through
    :func:`lpd.evaluate.evaluate` at each of :func:`eval_cfg_scales`, every rank taking its share.

    The guided run uses half the batch (its forward passes are twice as wide), as the released loop
    does; image ``i`` is the same at any batch size.  Runs go to ``OUTPUT_DIR/eval-epoch{E}-cfg{s}``
    (a preempted evaluation resumes there).  Returns ``{"cfg{s}_{metric}": value}`` for FID, IS
    and sampling seconds (the full record is the run folder's ``metrics.json``); an error is
    logged and training goes on.
    """
    from lpd.evaluate import evaluate
    from lpd.schedules import group_sizes

    if config.eval_group_sizes is not None:
        sizes = parse_group_sizes(config.eval_group_sizes, model.num_tokens)
    else:
        sizes = group_sizes(config.img_size, config.eval_steps)
    sampling = config.sampling.replace(bf16=config.bf16)
    results: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for scale in eval_cfg_scales(sampling.cfg):
            try:
                with torch.no_grad():
                    out = evaluate(
                        model, tokenizer_fn(), config.eval_num_images, sizes, sampling.replace(cfg=scale),
                        output_dir=os.path.join(config.output_dir, f"eval-epoch{epoch}-cfg{scale:g}"),
                        compute_fid=config.eval_ref_stats is not None, ref_stats=config.eval_ref_stats, seed=config.seed,
                        eval_bsz=config.eval_bsz if scale == 1.0 else max(1, config.eval_bsz // 2))
            except Exception as e:  # noqa: BLE001 - evaluation must not kill a long training run
                log(f"evaluation at epoch {epoch} (cfg {scale:g}) failed ({type(e).__name__}: {e}); training continues")
                continue
            results.update({f"cfg{scale:g}_{k}": float(out[k]) for k in _EVAL_METRICS
                            if isinstance(out.get(k), (int, float)) and not isinstance(out.get(k), bool)})
    finally:
        model.train(was_training)
    return results


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(
    config: TrainConfig,
    info: DistInfo | None = None,
    dataset: torch.utils.data.Dataset | None = None,
    tokenizer: torch.nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train (or resume) as ``config`` says; returns when done or after saving on a preemption signal.

    ``dataset`` replaces the one ``config`` names: items ``(tokens int [2, N] or [N], label)`` or
    ``(image float [3, S, S] in [-1, 1], label)``; ``tokenizer`` replaces the one built from
    ``config`` for images.  ``info`` defaults to :func:`lpd.distributed.init_distributed`.
    """
    if dataset is None:
        config.validate()
    info = info or init_distributed(config.device)
    device = info.device
    log = log if info.is_main else (lambda msg: None)
    os.makedirs(config.output_dir, exist_ok=True)
    resume = config.resume
    last_path = os.path.join(config.output_dir, "checkpoint-last.pth")
    if not resume and config.auto_resume and os.path.isfile(last_path):
        resume = config.output_dir
    found = sorted(n for n in os.listdir(config.output_dir) if n.startswith("checkpoint-") and n.endswith(".pth"))
    if not resume and found and not config.overwrite:
        raise CheckpointError(
            f"--output_dir {config.output_dir!r} holds checkpoints of another run ({', '.join(found[:3])}); continue it "
            f"with --resume {config.output_dir} (or --auto_resume), replace it with --overwrite, or use another --output_dir")

    # -------- model, data, schedules
    model = build_model(config, log).to(device)
    N, V = model.num_tokens, model.vocab_size
    schedules = parse_schedule_list(config.group_sizes_list, config.img_size, N)
    if config.eval_group_sizes is not None:  # checked now, not at the first evaluation hours later
        try:
            parse_group_sizes(config.eval_group_sizes, N)
        except ValueError as e:
            raise ValueError(f"--group_sizes (the evaluation schedule): {e}") from e
    if dataset is None:
        dataset = build_dataset(config, N, V)
    n_classes = _num_classes(dataset)
    if n_classes is not None and n_classes > model.class_num:
        raise ValueError(f"the training set has {n_classes} classes but the model only {model.class_num} (model_config class_num)")

    def make_tokenizer_once() -> torch.nn.Module:
        nonlocal tokenizer
        if tokenizer is None:
            from lpd.tokenizer import make_tokenizer

            tokenizer = make_tokenizer(config.tokenizer, config.vqgan_path, config.vq_config, config.seed, device)
        return tokenizer

    global_batch = config.batch_size * info.world_size
    base_lr = base_learning_rate(config.blr, global_batch, config.lr)
    optimizer = torch.optim.AdamW(model.param_groups(config.weight_decay), lr=base_lr, betas=(0.9, 0.95))
    scaler_state: dict[str, Any] = {}  # bf16 needs no loss scaling; kept for the released format
    steps_per_epoch = EpochBatchSampler(len(dataset), config.batch_size, config.seed, 0, info.rank, info.world_size).steps

    # -------- resume
    start_epoch, start_step, global_step = 0, 0, 0
    if resume:
        path = resolve_resume_path(resume)
        ckpt = load_checkpoint(path)
        check_finite(ckpt["model"], f"--resume {path!r}")
        load_into(model, ckpt["model"], source=f"--resume {path!r}")
        _load_optimizer(optimizer, ckpt.get("optimizer"), path, log)
        start_epoch, start_step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        if "step" not in ckpt and "epoch" in ckpt:  # released checkpoint: 'epoch' is the last finished one
            start_epoch += 1
        global_step = int(ckpt.get("global_step", start_epoch * steps_per_epoch + start_step))
        ds = ckpt.get("data_state", {})
        if ds and (ds.get("world_size"), ds.get("batch_size"), ds.get("num_samples"), ds.get("seed")) != (
            info.world_size, config.batch_size, len(dataset), config.seed):
            old_batch = int(ds.get("batch_size", config.batch_size)) * int(ds.get("world_size", info.world_size))
            start_step = min(steps_per_epoch, start_step * old_batch // global_batch)
            log(f"warning: resuming with another world size / batch size / data / seed than {path} was written with "
                f"({ds}); continuing at step {start_step} of epoch {start_epoch}, but not bit-exactly")
        rngs = ckpt.get("rng") or []
        if len(rngs) == info.world_size:
            _set_rng_state(rngs[info.rank])
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        log(f"resumed from {path}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}, global step {global_step}")
    model.train()

    ddp_model: torch.nn.Module = model
    if info.distributed:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.label_drop_prob == 0)

    if config.bf16:
        from lpd.sampling import warn_if_emulated_bf16

        warn_if_emulated_bf16(device, torch.bfloat16)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16)
    if info.distributed and not ddp_model.find_unused_parameters:
        _settle_ddp_buckets(ddp_model, model, config.batch_size, schedules[0], device, autocast)

    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    log(f"model: {n_params / 1e6:.2f}M parameters, {N} tokens per image, {len(schedules)} group-size schedules")
    log(f"data: {len(dataset)} samples, {info.world_size} process(es) x batch {config.batch_size} = {global_batch}, "
        f"{steps_per_epoch} steps per epoch; lr {base_lr:.3g} ({config.lr_schedule}, warm-up {config.warmup_epochs} epochs)")

    logger = _Logger(config, info, log)
    stop = _StopFlag(config.preempt_signals)
    stop.install()
    if info.is_main:
        with open(os.path.join(config.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(config.to_dict(), f, sort_keys=False)

    def save(epoch: int, step: int, names: Sequence[str]) -> None:
        rng = gather_object(_rng_state())
        if info.is_main:
            state = {
                "model": model.state_dict(),
                "model_config": model.config.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler_state,
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "steps_per_epoch": steps_per_epoch,
                "args": config.to_dict(),
                "rng": rng,
                "data_state": {"world_size": info.world_size, "batch_size": config.batch_size,
                               "num_samples": len(dataset), "seed": config.seed},
            }
            for name in names:
                save_checkpoint(state, os.path.join(config.output_dir, name))
        barrier()

    losses: list[float] = []
    preempted = False
    last_saved = global_step if resume else -1
    epoch, step = start_epoch, start_step
    try:
        for epoch in range(start_epoch, config.epochs):
            sampler = EpochBatchSampler(len(dataset), config.batch_size, config.seed, epoch, info.rank,
                                        info.world_size, start_step if epoch == start_epoch else 0)
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                                 pin_memory=config.pin_mem and device.type == "cuda",
                                                 worker_init_fn=stop.worker_init if config.num_workers > 0 else None)
            bar = None
            if info.is_main:
                from tqdm import tqdm

                bar = tqdm(total=steps_per_epoch, initial=sampler.start_step, desc=f"epoch {epoch}",
                           dynamic_ncols=True, mininterval=1.0 if os.isatty(2) else 30.0)
            t_last, steps_since = time.perf_counter(), 0
            epoch_losses: list[float] = []
            step = sampler.start_step
            for x, labels in _iterate_shielded(loader, stop.signals):
                def gen(purpose: int, rank: int = info.rank) -> torch.Generator:
                    return iteration_generator(config.seed, purpose, epoch, step, rank)

                tokens = _batch_tokens(x, gen(_FLIP), make_tokenizer_once, device)
                labels = labels.to(device, non_blocking=True).long()
                orders = random_orders(tokens.shape[0], N, gen(_ORDER)).to(device, non_blocking=True)
                sizes = schedules[int(torch.randint(len(schedules), (1,), generator=gen(_SCHEDULE)))]  # per rank, as released
                torch.manual_seed(derive_seed(config.seed, _DROPOUT, epoch, step, info.rank))  # dropout
                lr = lr_at(epoch + step / steps_per_epoch, base_lr, epochs=config.epochs,
                           warmup_epochs=config.warmup_epochs, schedule=config.lr_schedule,
                           min_lr=config.min_lr, decay_start_epoch=config.lr_decay_start_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                with autocast:
                    loss = ddp_model(tokens, labels, orders, sizes, generator=gen(_LABEL_DROP))
                # One collective per step: the mean loss and whether any rank was asked to stop.
                stats = torch.stack([loss.detach().float(), torch.tensor(float(stop.requested), device=device)])
                if info.distributed:
                    dist.all_reduce(stats)
                    stats[0] /= info.world_size
                loss_value, stop_now = float(stats[0]), bool(stats[1] > 0)
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at epoch {epoch}, step {step} (global step {global_step}); stopped "
                        f"before the update. The last good checkpoint is {last_path if os.path.exists(last_path) else 'none'}; "
                        f"lower --blr / --lr, keep --grad_clip, or check the data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(
                        f"gradient norm is {grad_norm} at epoch {epoch}, step {step} (global step {global_step}); "
                        f"stopped before the update; the last good checkpoint is kept")
                optimizer.step()
                step += 1
                global_step += 1
                steps_since += 1
                losses.append(loss_value)
                epoch_losses.append(loss_value)

                if bar is not None:
                    bar.update(1)
                if info.is_main and (global_step % max(1, config.log_freq) == 0 or step == steps_per_epoch):
                    now = time.perf_counter()
                    tok_s = steps_since * global_batch * N / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    values = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
                              "epoch": epoch + step / steps_per_epoch}
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", gnorm=f"{grad_norm:.3g}", tok_s=f"{tok_s:.3g}")
                    logger.scalars(values, global_step)

                if stop_now:
                    preempted = True
                    break
                if config.save_every_steps > 0 and global_step % config.save_every_steps == 0 and step < steps_per_epoch:
                    save(epoch, step, ["checkpoint-last.pth"])
                    last_saved = global_step
            if bar is not None:
                bar.close()
            if preempted and step < steps_per_epoch:
                save(epoch, step, ["checkpoint-last.pth"])
                log(f"preempted: saved {last_path} at epoch {epoch}, step {step} (global step {global_step}); "
                    f"continue with --resume {config.output_dir}")
                break
            start_step = 0
            last_due = (epoch + 1) % config.save_last_freq == 0 or epoch + 1 == config.epochs
            names = [] if last_saved == global_step or not last_due else ["checkpoint-last.pth"]
            if config.save_every_epochs > 0 and ((epoch + 1) % config.save_every_epochs == 0 or epoch + 1 == config.epochs):
                names.append(f"checkpoint-{epoch}.pth")
            if names:
                save(epoch, step, names)
                last_saved = global_step
            epoch_loss = float(np.mean(epoch_losses)) if epoch_losses else float("nan")
            log(f"epoch {epoch} done: mean loss {epoch_loss:.4f} over {len(epoch_losses)} steps, global step {global_step}")
            if preempted:
                log(f"preempted: saved {last_path} at the end of epoch {epoch}; continue with --resume {config.output_dir}")
                break
            if config.eval_freq > 0 and ((epoch + 1) % config.eval_freq == 0 or epoch + 1 == config.epochs):
                metrics = _evaluate(config, model, make_tokenizer_once, epoch, info, log)
                if metrics:
                    log(f"evaluation at epoch {epoch}: {metrics}")
                    logger.scalars({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, global_step)
    finally:
        stop.restore()
        logger.close()
    return TrainResult(model=model, epoch=epoch, step=step, global_step=global_step, preempted=preempted, losses=losses)
