"""Liger kernels (optional, CUDA only): fused linear cross-entropy for the loss, RMSNorm / SwiGLU / RoPE patches.

`liger-kernel` is not a dependency: `model.init_args.loss: liger` checks for it and for a CUDA device first and
says in one line what is missing. The loss reads the same labelled hidden states as the chunked loss
(`evaluation/teacher_forcing.py`); the kernel fuses the head matmul and the cross-entropy on the GPU.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn
from transformers import PreTrainedModel

from core.errors import UserInputError
from models.head import OutputHead


def check_liger(device: torch.device) -> None:
    """Raise a one-line UserInputError unless liger-kernel is installed and `device` is a CUDA device."""
    if importlib.util.find_spec("liger_kernel") is None:
        raise UserInputError(
            "model.loss=liger needs the liger-kernel package (pip install liger-kernel): use loss: chunked"
        )
    if torch.device(device).type != "cuda":
        raise UserInputError(f"model.loss=liger needs a CUDA device, this run is on {device}: use loss: chunked")


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Patch `model` (before any PEFT wrapping) with Liger's RMSNorm, SwiGLU / GeGLU MLP and RoPE kernels where
    Liger supports its family (others are left as they are); the loss is computed by `liger_cross_entropy`, so
    Liger's own forward replacement stays off."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model,
        rope=True,
        rms_norm=True,
        swiglu=True,
        geglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def liger_cross_entropy(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over the rows of `hidden` [N, H] of the cross-entropy of `targets` under the head's logits, with
    Liger's fused linear cross-entropy (soft-capping included)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    if type(head.layer) is not nn.Linear:
        raise UserInputError(
            f"model.loss=liger needs a plain lm_head, this model's is a {type(head.layer).__name__} (PEFT trainable "
            "tokens or adapters on the output layer): use loss: chunked"
        )
    if head.scale != 1.0:
        raise UserInputError(f"model.loss=liger cannot scale logits (this model scales by {head.scale}): use chunked")
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum", softcap=head.softcap)
    return loss(head.layer.weight, hidden.to(head.layer.weight.dtype), targets, head.layer.bias).float()
