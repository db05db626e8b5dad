"""Scoring without disturbing training (`evaluation/undisturbed.py`): modes, gradients and the RNG as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluation.undisturbed import undisturbed


def training_model() -> nn.Module:
    """Active dropout, a dropout already in eval mode, a layer in eval mode and a frozen layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 8))
    model[2].eval()
    model[3].eval()
    model[4].requires_grad_(False)
    return model


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    modes = {name: module.training for name, module in model.named_modules()}
    return modes, {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def test_inside_only_active_dropout_is_off_and_scores_are_deterministic():
    model, inputs = training_model(), torch.ones(4, 8)
    assert not torch.equal(model(inputs), model(inputs))  # the dropout really is active
    with undisturbed(model):
        assert not torch.is_grad_enabled()
        assert [module.training for module in model] == [True, False, False, False, True]
        first, second = model(inputs), model(inputs)
        assert torch.equal(first, second) and not first.requires_grad


def test_after_the_block_modes_gradients_and_the_rng_are_as_before():
    model = training_model()
    before, rng = snapshot(model), torch.get_rng_state()
    with undisturbed(model):
        model(torch.ones(2, 8))
        torch.rand(10)  # draws inside the block are forgotten
    assert snapshot(model) == before
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.is_grad_enabled()


def test_an_error_inside_the_block_restores_the_modes():
    model = training_model()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="scoring failed"), undisturbed(model):
        raise RuntimeError("scoring failed")
    assert snapshot(model) == before
