"""Scoring a model in the middle of training without disturbing the training: one context manager."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def undisturbed(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` scores deterministically and leaves no trace on the training: the dropout layers
    in training mode switch to eval (only they: a whole-model eval()/train() round trip froze QLoRA's adapters),
    gradients are off, and the global RNG (CPU, and the current CUDA device once CUDA is in use) is forked, so
    the draws after the block are those without it (a DataLoader draws its base seed from it: a resumed run stays
    bit-exact). The dropout layers are back in training mode after the block, also when it raises."""
    dropouts = [module for module in model.modules() if isinstance(module, nn.Dropout) and module.training]
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    for module in dropouts:
        module.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        for module in dropouts:
            module.train()
