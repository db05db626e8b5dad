"""Teacher-forced scoring, in one place: a frozen forward over given token ids, then fp32 log-probabilities
over the full vocabulary at the scored positions only, in chunks.

Likelihood dynamics (log-likelihood, perplexity, entropy) and top-k traces both read gold responses this
way. The backbone runs once per batch; the output head runs only on the hidden states of scored positions
(never on prompt positions that are not scored), at most `chunk_tokens` positions at a time, so no
[batch, length, vocab] tensor is ever formed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from models.head import OutputHead


@dataclass
class ScoredChunk:
    """Up to `chunk_tokens` scored positions of a batch, in row-major order (row, then position)."""

    rows: torch.Tensor  # [n] batch row of each position
    positions: torch.Tensor  # [n] index of the scored (predicted) token in its row
    targets: torch.Tensor  # [n] the token id at that position
    log_probs: torch.Tensor  # [n, vocab] fp32 log_softmax of the logits that predict it


def final_hidden_states(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The backbone's last hidden states [B, T, H] (final norm applied): what the output head reads.
    Positions follow the mask, so left- and right-padded batches give each row the same result."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    output = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    )
    return output.last_hidden_state


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
    head = OutputHead(model.get_base_model() if isinstance(model, PeftModel) else model)
    rows, positions = (scored[:, 1:] & attention_mask[:, :-1].bool()).nonzero(as_tuple=True)
    positions = positions + 1
    for start in range(0, len(rows), chunk_tokens):
        chunk_rows, chunk_positions = rows[start : start + chunk_tokens], positions[start : start + chunk_tokens]
        logits = head.logits(hidden[chunk_rows, chunk_positions - 1])
        yield ScoredChunk(
            rows=chunk_rows,
            positions=chunk_positions,
            targets=input_ids[chunk_rows, chunk_positions],
            log_probs=torch.log_softmax(logits.float(), dim=-1),
        )
