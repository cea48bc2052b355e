"""Learning-rate schedule: linear warmup, then cosine, linear or constant decay to a floor.

``iteration`` is the 0-based index of the optimizer step about to be taken, so the first step runs
at ``lr / warmup_iters`` and the last warmup step (``warmup_iters - 1``) at the full ``lr``:

- ``iteration < warmup_iters``: ``lr * (iteration + 1) / warmup_iters``;
- ``warmup_iters <= iteration <= decay_iters``: with ``t = (iteration - warmup_iters) /
  (decay_iters - warmup_iters)`` (``t = 1`` when the two are equal), ``cosine`` gives
  ``min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2``, ``linear`` gives ``lr - (lr - min_lr) * t``;
- ``iteration > decay_iters``: ``min_lr``.

``constant`` holds ``lr`` after warmup for ever, as Megatron's constant style does: ``min_lr`` and
``decay_iters`` only bound the other styles (``min_lr`` must still not exceed ``lr``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_STYLES = ("cosine", "linear", "constant")


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_rate(name: str, value: object) -> None:
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")


def check_schedule(*, lr: float, min_lr: float, warmup_iters: int, decay_iters: int, decay: str) -> None:
    """Raise ValueError naming the first argument that makes the schedule meaningless."""
    _check_rate("lr", lr)
    _check_rate("min_lr", min_lr)
    if min_lr > lr:
        raise ValueError(f"min_lr ({min_lr!r}) must not exceed lr ({lr!r})")
    _check_count("warmup_iters", warmup_iters)
    _check_count("decay_iters", decay_iters)
    if warmup_iters > decay_iters:
        raise ValueError(f"warmup_iters ({warmup_iters}) must not exceed decay_iters ({decay_iters})")
    if decay not in DECAY_STYLES:
        raise ValueError(f"decay must be one of {', '.join(DECAY_STYLES)}, got {decay!r}")


def _unchecked_learning_rate(iteration: int, lr: float, min_lr: float, warmup_iters: int,
                             decay_iters: int, decay: str) -> float:
    if iteration < warmup_iters:
        return lr * (iteration + 1) / warmup_iters
    if decay == "constant":
        return float(lr)
    if iteration > decay_iters:
        return float(min_lr)
    span = decay_iters - warmup_iters
    t = 1.0 if span == 0 else (iteration - warmup_iters) / span
    if decay == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    return lr - (lr - min_lr) * t


def learning_rate(iteration: int, *, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                  decay: str) -> float:
    """The learning rate of optimizer step ``iteration`` (0-based); see the module docstring."""
    check_schedule(lr=lr, min_lr=min_lr, warmup_iters=warmup_iters, decay_iters=decay_iters, decay=decay)
    _check_count("iteration", iteration)
    return _unchecked_learning_rate(iteration, lr, min_lr, warmup_iters, decay_iters, decay)


@dataclass(frozen=True)
class LRSchedule:
    """:func:`learning_rate` bound to one run's parameters, validated once at construction."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    decay: str = "cosine"

    def __post_init__(self) -> None:
        check_schedule(lr=self.lr, min_lr=self.min_lr, warmup_iters=self.warmup_iters,
                       decay_iters=self.decay_iters, decay=self.decay)

    def __call__(self, iteration: int) -> float:
        _check_count("iteration", iteration)
        return _unchecked_learning_rate(iteration, self.lr, self.min_lr, self.warmup_iters,
                                        self.decay_iters, self.decay)
