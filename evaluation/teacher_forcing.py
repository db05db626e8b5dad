"""Teacher forcing, in one place: the backbone over given token ids, then the output head only at the positions
that are scored, at most `chunk_tokens` positions at a time, so no [batch, length, vocab] tensor is ever formed.

Two readers share it:
- scoring (`teacher_forced_chunks`, frozen): fp32 log-probabilities over the full vocabulary at the scored
  positions (likelihood dynamics, top-k traces);
- the fine-tuning loss (`response_loss`, differentiable): the mean next-token cross-entropy over the labelled
  tokens, equal to the model's own `labels=` loss. The head and its gradient run chunk by chunk in the forward
  pass (the way fused linear cross-entropy kernels do), so a chunk's logits are freed before the next one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import PreTrainedModel

from models.head import OutputHead
from models.liger import liger_cross_entropy

LOGIT_BUDGET = 2**22
"""Logits per loss chunk (16 MB in fp32; 85 tokens at a 49k vocabulary): chunk_tokens = LOGIT_BUDGET // vocabulary
size. A chunk's logits, log-probabilities and their gradients are alive at once, at the step's peak."""


@dataclass
class ScoredChunk:
    """Up to `chunk_tokens` scored positions of a batch, in row-major order (row, then position)."""

    rows: torch.Tensor  # [n] batch row of each position
    positions: torch.Tensor  # [n] index of the scored (predicted) token in its row
    targets: torch.Tensor  # [n] the token id at that position
    log_probs: torch.Tensor  # [n, vocab] fp32 log_softmax of the logits that predict it


def base_model(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The transformers model under a PEFT wrapper (adapters stay injected in its modules)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def final_hidden_states(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] (final norm applied): what the output head reads.
    Positions follow the mask, so left- and right-padded batches give each row the same result. Packed rows
    pass their `position_ids` (restarting at 0 for every example): then no attention crosses examples (the
    attention implementation derives a block-diagonal mask, or its varlen path, from them) and the 2D mask is
    not passed on."""
    if position_ids is None:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    else:
        attention_mask = None
    output = base_model(model).get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return output.last_hidden_state


def predicted_positions(scored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of the tokens where `scored` ([B, T] bool) is true, position 0 excepted (nothing
    predicts it), in row-major order; the hidden state at position - 1 predicts each."""
    rows, positions = scored[:, 1:].nonzero(as_tuple=True)
    return rows, positions + 1


@torch.no_grad()
def teacher_forced_chunks(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scored: torch.Tensor,
    chunk_tokens: int = 1024,
) -> Iterator[ScoredChunk]:
    """Log-probabilities of the tokens where `scored` ([B, T] bool) is true, each predicted from the tokens
    before it; a token with no real token before it (position 0, the first after left padding) is never
    scored. The model is used as it is (call `.eval()` first)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    hidden = final_hidden_states(model, input_ids, attention_mask)
    head = OutputHead(base_model(model))
    before = torch.cat([torch.zeros_like(scored[:, :1]), attention_mask[:, :-1].bool()], dim=1)
    rows, positions = predicted_positions(scored & before)
    for start in range(0, len(rows), chunk_tokens):
        chunk_rows, chunk_positions = rows[start : start + chunk_tokens], positions[start : start + chunk_tokens]
        logits = head.logits(hidden[chunk_rows, chunk_positions - 1])
        yield ScoredChunk(
            rows=chunk_rows,
            positions=chunk_positions,
            targets=input_ids[chunk_rows, chunk_positions],
            log_probs=torch.log_softmax(logits, dim=-1),
        )


def response_losses(
    model: PreTrainedModel | PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed next-token cross-entropy of the labelled (response) tokens, and their count, from one
    teacher-forced pass (no gradient; the head runs on the labelled positions only, in chunks)."""
    sums = torch.zeros(len(input_ids), dtype=torch.float64, device=input_ids.device)
    counts = torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)
    for chunk in teacher_forced_chunks(model, input_ids, attention_mask, labels != -100):
        losses = -chunk.log_probs.gather(-1, chunk.targets[:, None])[:, 0]
        sums.index_add_(0, chunk.rows, losses.double())
        counts.index_add_(0, chunk.rows, torch.ones_like(chunk.rows))
    return sums, counts


def losses_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`response_losses` from a full forward's logits [B, T, V] (for models whose head cannot be called on its
    own, e.g. FSDP2-sharded ones)."""
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    ).view(targets.shape)
    return losses.sum(-1).double(), (targets != -100).sum(-1)


def labelled_hidden_states(
    model: PreTrainedModel | PeftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden [N, H], targets [N]): the final hidden states that predict the N labelled tokens (labels != -100,
    position 0 excepted), in row-major order, and those labels. Only these positions need the output head."""
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
    rows, positions = predicted_positions(labels != -100)
    return hidden[rows, positions - 1], labels[rows, positions]


def response_loss(
    model: PreTrainedModel | PeftModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled tokens (what `model(..., labels=labels).loss` gives),
    from the head applied to the labelled positions only, `chunk_tokens` at a time (default: LOGIT_BUDGET //
    vocabulary), or by Liger's fused kernel (`fused`, CUDA). Differentiable in every trainable weight, the
    head's included (PEFT-wrapped rows too)."""
    hidden, targets = labelled_hidden_states(model, input_ids, attention_mask, labels, position_ids)
    head = OutputHead(base_model(model))
    if fused:
        return liger_cross_entropy(head, hidden, targets) / len(targets)
    return head_cross_entropy(head, hidden, targets, chunk_tokens) / len(targets)


def head_cross_entropy(
    head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int | None = None
) -> torch.Tensor:
    """Sum over the N rows of `hidden` [N, H] of -log softmax(head(hidden))[target], in fp32, chunk by chunk."""
    chunk_tokens = chunk_tokens or max(1, LOGIT_BUDGET // head.layer.weight.shape[0])
    params = [parameter for parameter in head.layer.parameters() if parameter.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedHeadLoss.apply(hidden, targets, head, chunk_tokens, *params)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_tokens):
        logits = head.logits(hidden[start : start + chunk_tokens])
        total = total + F.cross_entropy(logits, targets[start : start + chunk_tokens], reduction="sum")
    return total


class _ChunkedHeadLoss(torch.autograd.Function):
    """`head_cross_entropy` with its gradients (in the hidden states and in the head's trainable weights, passed
    as `params`) computed chunk by chunk during the forward pass and kept: the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, targets, head, chunk_tokens, *params):
        needs_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if needs_hidden else hidden.new_zeros(0)
        grad_params = [torch.zeros_like(parameter) for parameter in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(targets), chunk_tokens):
            piece = hidden[start : start + chunk_tokens].detach().requires_grad_(needs_hidden)
            with torch.enable_grad():
                loss = F.cross_entropy(head.logits(piece), targets[start : start + chunk_tokens], reduction="sum")
                grads = torch.autograd.grad(loss, [piece, *params] if needs_hidden else params, allow_unused=True)
            if needs_hidden:
                grad_hidden[start : start + chunk_tokens], grads = grads[0], grads[1:]
            for accumulated, grad in zip(grad_params, grads, strict=True):
                if grad is not None:
                    accumulated += grad
            total += loss.detach()
        ctx.needs_hidden = needs_hidden
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled_hidden = grad_hidden * grad_output if ctx.needs_hidden else None
        return (scaled_hidden, None, None, None, *(grad * grad_output for grad in grad_params))
