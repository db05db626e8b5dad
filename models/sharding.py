"""FSDP2 sharding of a model built from a pretrained backbone, without a full copy of it on every rank.

Rank 0 builds the model for real (weights read from disk, planning rows initialised, adapters added); every other
rank builds the same model with its parameters on the meta device (no memory). Each decoder layer, then the whole
model, is sharded over the device mesh with `fully_shard`; then, one parameter at a time, rank 0's full tensor is
scattered into the shards (`distribute_tensor(..., src_data_rank=0)`) and the buffers (rotary frequencies and the
like, not sharded) are broadcast from rank 0 (`dist.broadcast`). Only rank 0 ever holds the full model, and after
sharding each rank holds 1/N of it.
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
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    rank0 = dist.get_rank() == 0
    model = build(not rank0)
    full = {name: parameter.detach() for name, parameter in model.named_parameters()} if rank0 else {}
    hf_model = next(module for module in model.modules() if isinstance(module, PreTrainedModel))  # inside PEFT
    layer_classes = set(hf_model._no_split_modules or ())  # the decoder layer class
    for module in model.modules():
        if type(module).__name__ in layer_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not rank0:
        model.to_empty(device=device)  # storage for the shards; the buffers are set below
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # one tensor at a time, rank 0 scatters the shards
            # other ranks pass an untouched full-size tensor: only its shape counts, its pages are never written
            source = full.pop(name).to(device) if rank0 else torch.empty(parameter.shape, dtype=parameter.dtype)
            shard = distribute_tensor(source.to(device), mesh, parameter.placements, src_data_rank=0)
            parameter.to_local().copy_(shard.to_local())
        for buffer in model.buffers():  # rotary frequencies and the like: not sharded, rank 0's everywhere
            dist.broadcast(buffer.data, src=0)
    return model
