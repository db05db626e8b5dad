"""Attention for packed rows: each example of a row attends causally to itself only, computed example by example
(no [length, length] mask, no work on pairs across examples or on padding). Rows without packing take
transformers' own sdpa path unchanged, so a model can keep this implementation for generation and evaluation.

A row is packed when its `position_ids` restart at 0 inside it (what `datamodules.batching.pack_collate` writes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def segment_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the offsets where an example starts (position 0), the row's start always included."""
    return [[0, *(torch.nonzero(row[1:] == 0).flatten() + 1).tolist()] for row in position_ids]


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa per example of a packed row (causal inside it); any other call is transformers' sdpa."""
    packed = (
        position_ids is not None
        and query.shape[2] == key.shape[2] == position_ids.shape[-1] > 1
        and bool((position_ids[:, 1:] == 0).any())
    )
    if not packed or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, position_ids=position_ids, **kwargs
        )
    length = query.shape[2]
    output = torch.empty_like(query)  # [batch, heads, length, head_dim]
    gqa = key.shape[1] != query.shape[1]
    for row, starts in enumerate(segment_starts(position_ids.expand(query.shape[0], -1))):
        for start, end in zip(starts, [*starts[1:], length], strict=True):
            output[row : row + 1, :, start:end] = F.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_attention(model: PreTrainedModel) -> None:
    """Switch a model that runs transformers' sdpa to the packed-row implementation (others keep theirs)."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)
