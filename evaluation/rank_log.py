"""Rank logs: during generation, the rank of every chosen token under the model's raw distribution.

`RankRecorder` is a logits processor placed before every decoding rule, so it sees the model's logits (after
HF's own length rules only). At step t it keeps the logits; the token chosen from them is the last column of
`input_ids` at step t + 1 (and of the finished sequences for the last step). Rank 1 = the argmax; ties count
in the token's favour (rank = 1 + #{logits strictly above it}). Two lists per sequence are kept:
- low-confidence ranks: at steps whose top-1 probability is below `low_confidence`;
- low-probability ranks: at steps where the chosen token's own probability is below `low_probability`.
Steps after a sequence's EOS or stop string (padding) are not logged; the EOS step itself is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from core.errors import UserInputError


@dataclass
class RankLogSpec:
    """Which generation steps the rank logs keep."""

    low_confidence: float = 1.0
    """Log the chosen token's rank at steps whose top-1 probability is below this: 1.0 (the reference's
    run_writeout.py) logs every step; 0.3 keeps only the uncertain ones."""
    low_probability: float = 0.1
    """Second log: the chosen token's rank at steps where its own probability is below this."""

    def __post_init__(self) -> None:
        for name in ("low_confidence", "low_probability"):
            if not 0 < getattr(self, name) <= 1:
                raise UserInputError(f"rank_log.{name} must be in (0, 1], got {getattr(self, name)}")


class RankRecorder(LogitsProcessor):
    """Records (rank, top-1 prob, chosen prob) of every chosen token; `finish` turns them into the two lists."""

    def __init__(self, spec: RankLogSpec) -> None:
        self.spec = spec
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []  # [B, 3] per step: rank, top-1 prob, chosen prob
        self.low_confidence: list[list[int]] = []
        self.low_probability: list[list[int]] = []

    def _record(self, chosen: torch.Tensor) -> None:
        logits = self.previous
        chosen_logit = logits.gather(-1, chosen[:, None])
        rank = (logits > chosen_logit).sum(-1) + 1
        probs = logits.float().softmax(-1)
        self.steps.append(torch.stack([rank.float(), probs.amax(-1), probs.gather(-1, chosen[:, None])[:, 0]], -1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._record(input_ids[:, -1])
        self.previous = scores.detach().clone()
        return scores

    def finish(
        self,
        new_tokens: torch.Tensor,
        eos_ids: list[int],
        pad_id: int | None = None,
        ended_by_stop: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        """Log the last step and cut each row after its first EOS, or before the padding that follows a stop
        string (`ended_by_stop(tokens)`: whether those tokens already hold one; a tokenizer that pads with its EOS
        makes that padding look like an EOS step); fills `low_confidence` / `low_probability`, one list per row."""
        if self.previous is not None and len(self.steps) < new_tokens.shape[1]:
            self._record(new_tokens[:, len(self.steps)])
        if not self.steps:
            self.low_confidence = self.low_probability = [[] for _ in range(new_tokens.shape[0])]
            return
        steps = torch.stack(self.steps, 1).cpu()  # [B, T, 3]
        tokens = new_tokens.cpu()
        ends = torch.isin(tokens, torch.tensor(eos_ids)) | (tokens == pad_id)
        self.low_confidence, self.low_probability = [], []
        for row in range(steps.shape[0]):
            end = ends[row].nonzero()
            if not len(end):
                length = steps.shape[1]
            elif ended_by_stop is not None and ended_by_stop(tokens[row, : int(end[0])]):
                length = int(end[0])
            else:
                length = int(end[0]) + int(int(tokens[row, end[0]]) in eos_ids)
            low_confidence, low_probability = logged_ranks(self.spec, steps[row, :length])
            self.low_confidence.append(low_confidence)
            self.low_probability.append(low_probability)
        self.previous, self.steps = None, []


def logged_ranks(spec: RankLogSpec, steps: torch.Tensor) -> tuple[list[int], list[int]]:
    """The two logs of one sequence from its steps [T, 3] (rank, top-1 prob, chosen prob), for every engine."""
    rank, top1, chosen = steps.unbind(-1)
    return rank[top1 < spec.low_confidence].long().tolist(), rank[chosen < spec.low_probability].long().tolist()
