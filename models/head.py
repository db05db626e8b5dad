"""A causal LM's output head as a function of the final hidden state (logit scaling and soft-capping included)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


class OutputHead:
    """The model's hidden -> logits map: lm_head, then the config's logit scaling / soft-capping if any."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.layer = model.get_output_embeddings()
        config = model.config.get_text_config()
        self.scale = float(getattr(config, "logit_scale", None) or 1.0)
        self.scale /= float(getattr(config, "logits_scaling", None) or 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None)

    @property
    def linear(self) -> bool:
        return self.softcap is None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Exact logits of `hidden`, in fp32."""
        logits = self.layer(hidden.to(self.layer.weight.dtype)).float() * self.scale
        return torch.tanh(logits / self.softcap) * self.softcap if self.softcap else logits

    def delta_logits(self, delta: torch.Tensor) -> torch.Tensor:
        """What adding `delta` to the hidden state adds to the logits (linear heads): scale * W delta."""
        return F.linear(delta.to(self.layer.weight.dtype), self.layer.weight).float() * self.scale

    def delta_logits_grad(self, gradient: torch.Tensor) -> torch.Tensor:
        """The gradient in delta of a loss whose gradient in `delta_logits(delta)` is `gradient`: scale * Wᵀ g."""
        return (gradient.to(self.layer.weight.dtype) @ self.layer.weight).float() * self.scale
