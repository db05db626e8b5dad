"""The learning-rate schedule (`lightning_modules/schedules.py`) at chosen steps, and the length the fine-tuning
module gives it when the config leaves `total_steps` out: the number of optimizer steps of the run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from datamodules.reasoning import ReasoningDataModule
from lightning_modules.finetune import CausalLMFineTuner
from lightning_modules.schedules import WarmupCosineLR
from models.loading import ModelSpec


def rates(scheduler: WarmupCosineLR, steps: int) -> list[float]:
    """The learning rate of optimizer steps 0 .. steps - 1."""
    optimizer, seen = scheduler.optimizer, []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def sgd(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_warmup_then_cosine_decay_to_the_floor():
    """Base rate 0.5, 2 warmup steps of 10, floor 0.1 x base: lr(s) = 0.5 s / 2 in the warmup, then
    0.5 (0.1 + 0.9 (1 + cos(pi p)) / 2) with p = (s - 2) / 8, held at the floor after step 10."""
    scheduler = WarmupCosineLR(sgd(0.5), warmup=2, total_steps=10, min_lr_ratio=0.1)
    seen = rates(scheduler, 13)
    assert seen[0] == 0.0 and seen[1] == pytest.approx(0.25)
    assert seen[2] == pytest.approx(0.5)  # the end of the warmup: the full rate
    assert seen[4] == pytest.approx(0.4340990257669732)  # p = 1/4: 0.5 (0.1 + 0.45 (1 + 0.70710678))
    assert seen[6] == pytest.approx(0.275)  # p = 1/2: 0.5 (0.1 + 0.45)
    assert seen[10] == pytest.approx(0.05) and seen[12] == pytest.approx(0.05)  # the floor


def test_a_fractional_warmup_is_a_share_of_the_run():
    """warmup 0.25 of 8 steps = 2 steps; no floor: the rate reaches 0 at step 8."""
    seen = rates(WarmupCosineLR(sgd(1.0), warmup=0.25, total_steps=8), 9)
    assert seen[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert seen[5] == pytest.approx(0.5)  # p = 3/6: (1 + cos(pi / 2)) / 2
    assert seen[8] == pytest.approx(0.0, abs=1e-12)


def test_the_module_gives_an_unset_schedule_the_runs_optimizer_steps(tiny_llama):
    """3 batches per epoch accumulated 2 by 2: optimizer steps after batches 2 and 3 (the epoch's end), 2 per
    epoch, 4 in 2 epochs; the schedule ends there (no floor: rate 0 after the last step)."""
    module = CausalLMFineTuner(
        backbone=ModelSpec(name=str(tiny_llama)),
        mode="lora",
        scheduler=lambda optimizer: WarmupCosineLR(optimizer, warmup=0.5),
    )
    data = ReasoningDataModule(tokenizer=module.tokenizer, train_limit=3, batch_size=1, val_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert len(data.train_dataloader()) == 3
    expected = math.ceil(3 / 2) * 2
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == module.estimated_total_steps == scheduler.total_steps == expected
    assert scheduler.last_epoch == expected
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
