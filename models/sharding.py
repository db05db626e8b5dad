"""FSDP2 sharding of a model built from a pretrained backbone, without a full copy of it on every rank.

Rank 0 builds the model for real (weights read from disk, planning rows initialised, adapters added); every other
rank builds the same model with its parameters on the meta device (no memory). Each decoder layer, then the whole
model, is sharded over the device mesh with `fully_shard`, and rank 0's weights are broadcast into the shards
(`set_model_state_dict(broadcast_from_rank0=True)`): only rank 0 ever holds the full model, and after sharding each
rank holds 1/N of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel


def shard_model(build: Callable[[bool], nn.Module], mesh, device: torch.device) -> nn.Module:
    """`build(empty)` on every rank (empty = parameters on the meta device, ranks > 0), sharded over `mesh` with
    FSDP2, holding rank 0's weights on `device`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank0 = dist.get_rank() == 0
    model = build(not rank0)
    full = {key: value.to(device) for key, value in _without_aliases(model.state_dict()).items()} if rank0 else {}
    hf_model = next(module for module in model.modules() if isinstance(module, PreTrainedModel))  # inside PEFT
    layer_classes = set(hf_model._no_split_modules or ())  # the decoder layer class
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not rank0:
        model.to_empty(device=device)  # storage for the shards; the buffers are recomputed below
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)  # aliases: tied
    set_model_state_dict(model, full, options=options)
    del full
    _broadcast_buffers(model)
    return model


def _broadcast_buffers(model: nn.Module) -> None:
    """Buffers that no state dict holds (rotary frequencies) from rank 0, so that every rank computes alike."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def _without_aliases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once (tied weights appear under several names; loading one sets all)."""
    seen, unique = set(), {}
    for key, value in state.items():
        if value.data_ptr() not in seen or value.numel() == 0:
            seen.add(value.data_ptr())
            unique[key] = value
    return unique
