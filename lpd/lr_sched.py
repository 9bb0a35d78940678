"""Learning-rate schedules of the released recipe, evaluated per iteration at a fractional epoch.

``lr(epoch)`` with ``epoch = epoch_index + step / steps_per_epoch``:

* linear warm-up from 0 to ``base_lr`` over ``warmup_epochs``, then
* ``constant``: ``base_lr``;
* ``cosine``: half a cosine from ``base_lr`` (end of warm-up) to ``min_lr`` (``epochs``);
* ``constant+cosine`` (the LPD recipe): ``base_lr`` until ``decay_start_epoch``, then half a cosine
  to ``min_lr`` at ``epochs`` (256 px: warm-up 50, decay from 400, ``min_lr`` 1e-5 at 450).

The value is a pure function of its arguments, so a resumed run sets exactly the same rates.
"""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "lr_at", "base_learning_rate"]

LR_SCHEDULES = ("constant", "cosine", "constant+cosine")


def base_learning_rate(blr: float, global_batch: int, lr: float | None = None) -> float:
    """``lr`` when given, else ``blr * global_batch / 256`` (the released scaling rule)."""
    return float(lr) if lr is not None else float(blr) * global_batch / 256.0


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
    """The learning rate at fractional ``epoch`` (see the module docstring)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    if schedule == "constant":
        return base_lr
    start = warmup_epochs if schedule == "cosine" else (decay_start_epoch if decay_start_epoch is not None else warmup_epochs)
    start = max(start, warmup_epochs)
    if epoch < start:
        return base_lr
    span = epochs - start
    if span <= 0:
        return min_lr
    t = min(1.0, (epoch - start) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
