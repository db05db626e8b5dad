"""The blow-up guard's checks and messages (`models/blow_up.py`); the end-to-end stops are in test_cli.py."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from core.errors import TrainingStopped
from models.blow_up import EXPLODING_GROWTH, blew_up, blown_up_step, non_finite_loss, trainable_norm


def save_checkpoint(folder: Path, name: str, step: int, value: float) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((2,), value)}}, folder / name)
    return (folder / name).resolve()


def test_the_norm_is_over_the_trainable_weights_only():
    model = nn.Module()
    model.a = nn.Parameter(torch.tensor([3.0, 0.0]))
    model.b = nn.Parameter(torch.tensor([[4.0]]))
    model.frozen = nn.Parameter(torch.tensor([100.0]), requires_grad=False)
    assert trainable_norm(model) == 5.0  # sqrt(3^2 + 4^2)
    model.a.requires_grad_(False)
    model.b.requires_grad_(False)
    assert trainable_norm(model) == 0.0


def test_a_blow_up_is_non_finite_or_more_than_the_growth_limit():
    assert EXPLODING_GROWTH == 10.0
    assert not blew_up(1.0, 10.0)  # exactly ten-fold: still fine
    assert blew_up(1.0, 10.001)
    assert blew_up(2.0, math.inf) and blew_up(2.0, math.nan)
    assert not blew_up(0.0, 5.0)  # weights that start at zero can grow from it
    assert not blew_up(3.0, 0.5)


def test_the_messages_name_the_last_finite_checkpoint_before_the_first_bad_step(tmp_path):
    save_checkpoint(tmp_path, "step1.ckpt", 1, 1.0)
    good = save_checkpoint(tmp_path, "step2.ckpt", 2, 1.0)
    save_checkpoint(tmp_path, "step3.ckpt", 3, 1.0)  # saved at the first bad step: not before it
    save_checkpoint(tmp_path, "later.ckpt", 5, float("nan"))

    error = blown_up_step(2, 1.0, 1000.0, [1e6, 1e-3, 1e6], [tmp_path])
    assert isinstance(error, TrainingStopped)
    assert str(error) == (
        "the optimizer step from step 2 to 3 blew up the trainable weights (norm 1 -> 1e+03; learning rate 0.001, "
        f"1e+06: lower it): training stopped before they were saved; the last checkpoint before step 3, with finite "
        f"weights: {good} (step 2)"
    )
    error = non_finite_loss(float("nan"), 3, [tmp_path])
    assert str(error) == (
        f"non-finite training loss (nan) at step 3: training stopped; the last checkpoint before step 3, with finite "
        f"weights: {good} (step 2)"
    )


def test_the_messages_say_when_no_checkpoint_was_saved_before(tmp_path):
    save_checkpoint(tmp_path, "step4.ckpt", 4, 1.0)
    assert str(non_finite_loss(float("inf"), 2, [tmp_path, tmp_path / "absent"])) == (
        "non-finite training loss (inf) at step 2: training stopped; no checkpoint was saved before step 2"
    )
