"""The released training recipe: the lr schedule, the epoch batches, the group-size schedules and
the random draws of one iteration (each a function of seed, epoch, step and rank)."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
import yaml
from torch import Generator, Tensor

from lpd.config import derive_seed
from lpd.schedules import parse_group_sizes, training_schedules

LR_SCHEDULES = ("constant", "cosine", "constant+cosine")


class Stream(enum.IntEnum):
    """The purposes of the random streams (part of the seed derivation; never renumber)."""

    PERM, FLIP, ORDER, SCHEDULE, LABEL_DROP, DROPOUT, INIT = range(7)


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
    """The learning rate at fractional ``epoch``: linear warm-up to ``base_lr``, then ``constant``,
    or half a cosine to ``min_lr`` at ``epochs`` from warm-up's end (``cosine``) or
    ``decay_start_epoch`` (``constant+cosine``)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    start = warmup_epochs
    if schedule != "cosine" and decay_start_epoch is not None:
        start = max(decay_start_epoch, warmup_epochs)
    if schedule == "constant" or epoch < start:
        return base_lr
    if epochs <= start:
        return min_lr
    done = min(1.0, (epoch - start) / (epochs - start))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * done))


def iteration_generator(seed: int, purpose: int, epoch: int, step: int, rank: int) -> Generator:
    """A CPU ``torch.Generator`` for one random stream of one iteration of one rank."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose, epoch, step, rank))


class Draws(NamedTuple):
    """The random choices of one iteration of one rank."""

    flip: Tensor  # [B] bool: take the horizontally flipped image
    orders: Tensor  # [B, N] random permutations (argsort of float64 uniforms)
    sizes: list[int]  # the group-size schedule (per rank, as released)
    label_drop: Generator  # the classifier-free guidance label dropping
    dropout_seed: int  # torch.manual_seed of the step (dropout)


def iteration_draws(
    seed: int, epoch: int, step: int, rank: int, batch: int, num_tokens: int, choices: list
) -> Draws:
    """The :class:`Draws` of iteration ``(epoch, step)`` of ``rank``; sizes one of ``choices``."""

    def gen(purpose: Stream) -> Generator:
        return iteration_generator(seed, purpose, epoch, step, rank)

    return Draws(
        torch.rand(batch, generator=gen(Stream.FLIP)) < 0.5,
        torch.rand(batch, num_tokens, generator=gen(Stream.ORDER), dtype=torch.float64).argsort(1),
        choices[int(torch.randint(len(choices), (1,), generator=gen(Stream.SCHEDULE)))],
        gen(Stream.LABEL_DROP),
        gen(Stream.DROPOUT).initial_seed(),
    )


def batch_tokens(x: Tensor, flip: Tensor, get_tokenizer: Callable, device: torch.device) -> Tensor:
    """Raster tokens ``[B, N]`` of a batch, the flipped variant where ``flip``: token cache rows
    ``[B, 2, N]`` (original, flipped) or ``[B, N]``, or images encoded by ``get_tokenizer()``."""
    B = x.shape[0]
    if not torch.is_floating_point(x):
        if x.dim() == 3:
            x = x[torch.arange(B), flip.long()]
        return x.to(device, non_blocking=True).long()
    x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device, non_blocking=True)
    with torch.no_grad():
        return get_tokenizer().encode(x).reshape(B, -1).long()


class EpochBatchSampler(torch.utils.data.Sampler):
    """This rank's batches of one epoch, a function of ``(seed, epoch, rank, world_size)``: the
    permutation padded by wrapping, dealt round-robin (as ``DistributedSampler``), the last
    incomplete batch dropped, ``start_step`` skipped."""

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
        self.num_samples, self.batch_size, self.seed, self.epoch = (
            num_samples,
            batch_size,
            seed,
            epoch,
        )
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.per_rank = math.ceil(num_samples / world_size)
        self.steps = self.per_rank // batch_size
        if self.steps == 0:
            raise ValueError(
                f"{num_samples} samples over {world_size} process(es) give {self.per_rank} per "
                f"process, fewer than one batch of {batch_size}; lower --batch_size or add data"
            )

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, Stream.PERM, self.epoch))
        perm = torch.randperm(self.num_samples, generator=g)
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
    """The group-size schedules one iteration draws from: ``None`` (the released tables of the
    resolution), schedules separated by ``;`` (e.g. ``"[1]*256; [1*41, 2*46, 3*41]"``), a YAML
    file of a list of them, or such a list."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        try:
            return [list(s) for s in training_schedules(img_size)]
        except ValueError as e:
            raise ValueError(f"{e}; pass --group_sizes_list, e.g. '[1]*{num_tokens}'") from e
    if isinstance(spec, str) and os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            spec = yaml.safe_load(f)
        if not isinstance(spec, list) or not spec:
            raise ValueError(
                f"--group_sizes_list file {f.name!r} must hold a non-empty YAML list of schedules"
            )
    if isinstance(spec, str):
        items: list[Any] = [s for s in spec.split(";") if s.strip()]
    elif isinstance(spec, (list, tuple)):  # a flat list of ints is one schedule
        items = [list(spec)] if all(isinstance(v, int) for v in spec) else list(spec)
    else:
        raise ValueError(f"--group_sizes_list: cannot read {spec!r}")
    return [parse_group_sizes(s, num_tokens) for s in items]


def eval_cfg_scales(cfg: float) -> list[float]:
    """The guidance scales of evaluations in training: 1.0, then ``cfg`` unless 0 or 1."""
    return [1.0] if cfg in (0.0, 1.0) else [1.0, float(cfg)]
