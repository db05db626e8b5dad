"""The one seeding rule of sampled generation: sample k of question q draws from seed (generation seed, q, k).

Both engines take their seeds from `sample_seeds`: the HF engine seeds one `torch.Generator` per sequence
(`SeededSampler`), the vLLM engine sends one request per sequence with that seed. A question's samples
therefore depend on neither its batch (size, neighbours, position) nor the process evaluating it, nor on
which other questions `test_limit` selects. Across engines the seeds are equal but the random streams are not
(vLLM's sampler draws its own way): sampled tokens differ between engines; greedy tokens do not.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from evaluation.decoding import DecodingSpec, filter_logits


def sample_seed(seed: int, question_id: str, sample_index: int) -> int:
    """The seed of sample `sample_index` of question `question_id` (in [0, 2**63), stable across processes)."""
    digest = hashlib.sha256(json.dumps([seed, str(question_id), sample_index]).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def sample_seeds(seed: int, question_ids: Sequence[str], repeats: int) -> list[int]:
    """Seeds of a batch's sequences in generation order: question i's sample k is sequence i * repeats + k."""
    return [sample_seed(seed, question_id, k) for question_id in question_ids for k in range(repeats)]


class SeededSampler(LogitsProcessor):
    """The HF engine's sampler: the decoding rule (`filter_logits`), then one draw per sequence from that
    sequence's own generator. It returns logits where only the drawn token is finite, so `generate` runs with
    `do_sample=False` and its argmax takes the drawn token; the global random state is never touched."""

    def __init__(self, spec: DecodingSpec, seeds: list[int]) -> None:
        self.spec, self.seeds = spec, seeds
        self.generators: list[torch.Generator] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != scores.shape[0]:
            raise ValueError(f"SeededSampler has {len(self.seeds)} seeds for {scores.shape[0]} sequences")
        if not self.generators:  # on the first step, where the logits are
            self.generators = [torch.Generator(scores.device).manual_seed(seed) for seed in self.seeds]
        probs = filter_logits(self.spec, scores.float()).softmax(-1)
        rows = zip(probs, self.generators, strict=True)
        drawn = torch.cat([torch.multinomial(row, 1, generator=generator) for row, generator in rows])
        chosen = torch.full_like(scores, -math.inf)
        return chosen.scatter_(1, drawn[:, None], 0.0)
