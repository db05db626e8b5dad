"""The model a fine-tuning run trains, built from the run's settings in one call (no Lightning needed).

The dtype policy, the kernels patched in (packed attention; lean gated MLPs, or Liger's kernels for the liger
loss), the planning rows and adapters (`models/adapters.py`) and, under FSDP2, the sharding (`models/sharding.py`).
The tokenizer it is built for is `models.adapters.planning_tokenizer`'s.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from models.adapters import LoraSpec, build_trainable_model
from models.gated_mlp import use_lean_gated_mlps
from models.liger import apply_liger_kernels, check_liger
from models.loading import ModelSpec, load_model
from models.packed_attention import use_packed_attention
from models.sharding import shard_model
from tasks.planning import PlanningSpec

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Loss = Literal["chunked", "hf", "liger"]
"""How the training loss is computed (see `CausalLMFineTuner`); liger also patches the model with its kernels."""


def training_backbone(backbone: ModelSpec, dtype: torch.dtype) -> ModelSpec:
    """`backbone` loaded in `dtype` when that is not float32 and the backbone is not quantised (precision *-true:
    Lightning casts the weights to its dtype, which it makes the default one while the model is built)."""
    if dtype == torch.float32 or backbone.quantization is not None:
        return backbone
    return replace(backbone, dtype=str(dtype).removeprefix("torch."))


def build_training_model(
    backbone: ModelSpec,
    mode: str,
    lora: LoraSpec,
    planning: PlanningSpec,
    loss: Loss,
    tokenizer: PreTrainedTokenizerBase,
    new_tokens: set[str],
    mesh: DeviceMesh | None = None,
    device: torch.device | None = None,
) -> nn.Module:
    """The trainable model of a run, in training mode: `backbone` in the default dtype (`training_backbone`),
    attention example by example in packed rows, the gated MLPs' activation recomputed in backward (or Liger's
    kernels with loss liger, which needs `device` to be CUDA), room for `tokenizer`'s planning tokens (the rows
    of `new_tokens` initialised) and wrapped for `mode`. With a 1-D device `mesh` (FSDP2): sharded over it on
    `device`, where only rank 0 reads the weights."""
    if loss == "liger":
        check_liger(device or torch.device("cpu"))
    backbone = training_backbone(backbone, torch.get_default_dtype())

    def build(empty: bool = False) -> nn.Module:
        model = load_model(backbone, empty=empty)
        use_packed_attention(model)  # packed rows: attention example by example; other rows: sdpa as before
        if loss == "liger":
            apply_liger_kernels(model)
        else:
            use_lean_gated_mlps(model)  # the MLP's activation is recomputed in backward, not stored
        return build_trainable_model(model, tokenizer, mode, lora, planning, new_tokens)

    model = build() if mesh is None else shard_model(build, mesh, device)
    return model.train()  # from_pretrained returns eval mode; Lightning switches modes per stage
