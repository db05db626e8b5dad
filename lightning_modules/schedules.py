"""Learning-rate schedules usable as `scheduler:` callables in a config."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warmup from 0, then cosine decay to `min_lr_ratio` x the base learning rate.

    Args:
        optimizer: the optimizer (given by the module).
        warmup: warmup length; a value < 1 is a fraction of `total_steps`, otherwise a step count.
        total_steps: steps of the whole run; None = the Trainer's estimate (set by the module).
        min_lr_ratio: the final learning rate as a fraction of the base one.
    """

    def __init__(
        self, optimizer: Optimizer, warmup: float = 0.05, total_steps: int | None = None, min_lr_ratio: float = 0.0
    ) -> None:
        self.warmup = warmup
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        total = max(self.total_steps or 1, 1)
        warmup_steps = self.warmup * total if self.warmup < 1 else self.warmup
        if step < warmup_steps:
            return step / warmup_steps
        progress = min((step - warmup_steps) / max(total - warmup_steps, 1), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def refit_total_steps(scheduler: WarmupCosineLR, total_steps: int) -> int | None:
    """Give a restored schedule the length `total_steps` (a resumed run that trains to another step than the run
    that saved it: its restored length would, e.g., hold the learning rate at the end of its decay, zero, for every
    step past it), and recompute the learning rate of its current step. Returns the old length, or None when it
    was the same."""
    old = scheduler.total_steps
    if old == total_steps:
        return None
    scheduler.total_steps = total_steps
    factors = zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    rates = [base * factor(scheduler.last_epoch) for factor, base in factors]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # noqa: SLF001 - what get_last_lr() reports
    return old
