"""Gated MLPs (SwiGLU / GeGLU: `down(act(gate(x)) * up(x))`) that keep less for the backward pass.

Autograd keeps three [tokens, intermediate] tensors for `act(gate) * up`: the activation's input, its output and
`up`. `GatedProduct` keeps the two inputs and recomputes the activation (elementwise, cheap) in backward, so one
intermediate-sized tensor per layer and token is never stored (Liger's SwiGLU kernel does the same on CUDA). The
forward values are those of the model's own code, bit for bit; gradients equal them to rounding.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class GatedProduct(torch.autograd.Function):
    """`activation(gate) * up`, saving `gate` and `up` only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, activation: nn.Module) -> torch.Tensor:
        ctx.activation = activation
        ctx.save_for_backward(gate, up)
        return activation(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            gate = gate.detach().requires_grad_()
            activated = ctx.activation(gate)
        grad_gate = torch.autograd.grad(activated, gate, grad * up)[0] if ctx.needs_input_grad[0] else None
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def gated_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's own computation; with autograd on, the product goes through `GatedProduct`."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return self.down_proj(GatedProduct.apply(gate, up, self.act_fn))
    return self.down_proj(self.act_fn(gate) * up)


def is_gated_mlp(module: nn.Module) -> bool:
    """A transformers MLP block of the `down(act(gate(x)) * up(x))` form (Llama, Mistral, Qwen2/3, Gemma 1-3, ...)."""
    return type(module).__name__.endswith("MLP") and all(
        isinstance(getattr(module, name, None), nn.Module) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")
    )


def use_lean_gated_mlps(model: nn.Module) -> int:
    """Switch every gated MLP block of `model` to `gated_mlp_forward` (before or after PEFT wrapping); returns how
    many were switched (0 for other families, left as they are)."""
    blocks = [module for module in model.modules() if is_gated_mlp(module)]
    for block in blocks:
        block.forward = types.MethodType(gated_mlp_forward, block)
    return len(blocks)
