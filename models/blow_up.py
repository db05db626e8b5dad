"""The blow-up guard of a training run: when a step's loss is non-finite or an optimizer step blows up the
trainable weights, training stops with one line naming the newest checkpoint whose weights are still good.

`CausalLMFineTuner` calls these in `training_step` and `optimizer_step`, which run before any callback's hook of
the step can save the bad weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from core.checkpoint_file import last_finite_checkpoint
from core.errors import TrainingStopped

EXPLODING_GROWTH = 10.0
"""An optimizer step that multiplies the norm of the trainable weights by more than this is a blow-up."""


def trainable_norm(model: nn.Module) -> float:
    """The L2 norm (in float32) of all trainable weights of `model` together; 0 when none trains."""
    norms = [torch.linalg.vector_norm(p.detach(), dtype=torch.float32) for p in model.parameters() if p.requires_grad]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def blew_up(before: float, after: float) -> bool:
    """Whether weights of norm `before` that have norm `after` one optimizer step later blew up: non-finite, or
    grown more than EXPLODING_GROWTH-fold (a learning rate far too high)."""
    return not math.isfinite(after) or (before > 0 and after > EXPLODING_GROWTH * before)


def non_finite_loss(loss: float, step: int, checkpoint_folders: Iterable[Path]) -> TrainingStopped:
    """The error for a non-finite loss at training step `step` (the weights of this step produce it)."""
    return stopped(f"non-finite training loss ({loss}) at step {step}: training stopped", step, checkpoint_folders)


def blown_up_step(
    step: int, before: float, after: float, rates: Iterable[float], checkpoint_folders: Iterable[Path]
) -> TrainingStopped:
    """The error for the optimizer step from `step` to `step + 1` that took the weights' norm from `before` to
    `after` at learning rates `rates`: the weights of step + 1 are the first bad ones."""
    rates = ", ".join(f"{lr:.3g}" for lr in sorted(set(rates)))
    what = (
        f"the optimizer step from step {step} to {step + 1} blew up the trainable weights (norm {before:.3g} "
        f"-> {after:.3g}; learning rate {rates}: lower it): training stopped before they were saved"
    )
    return stopped(what, step + 1, checkpoint_folders)


def stopped(what: str, bad_step: int, checkpoint_folders: Iterable[Path]) -> TrainingStopped:
    """`what`, then the newest checkpoint in `checkpoint_folders` with finite weights saved before `bad_step` (the
    first step whose weights are bad), or that there is none."""
    good = last_finite_checkpoint(list(checkpoint_folders), bad_step)
    if good is None:
        return TrainingStopped(f"{what}; no checkpoint was saved before step {bad_step}")
    return TrainingStopped(
        f"{what}; the last checkpoint before step {bad_step}, with finite weights: {good[0]} (step {good[1]})"
    )
