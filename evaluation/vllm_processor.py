"""vLLM v1 adapter of the correctness-first decoding rules (imports vLLM: load only when it is installed).

The formulas are `evaluation.decoding.filter_logits`, the same function the HF engine's `SeededSampler` calls.
Per-request settings travel as `SamplingParams(extra_args={DECODING_KEY: asdict(spec)})`. The processor
declares itself not argmax-invariant, so vLLM applies it first, on the raw fp32 logits; the request itself
samples at vLLM temperature 1 with vLLM's own top-k/top-p/min-p off, so the rule decides alone (as in the HF
engine).
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from core.errors import UserInputError
from evaluation.decoding import DecodingSpec, filter_rows

DECODING_KEY = "reasoning_lab_decoding"
"""The key of `SamplingParams.extra_args` holding the `DecodingSpec` fields of a request."""


def request_spec(params: SamplingParams | None) -> DecodingSpec | None:
    """The decoding rule a request asks for (None = untouched)."""
    settings = ((params.extra_args if params is not None else None) or {}).get(DECODING_KEY)
    return DecodingSpec(**settings) if settings else None


class CorrectnessFirstLogitsProcessor(LogitsProcessor):
    """`filter_rows` over vLLM's running batch, each row with its request's `DecodingSpec`."""

    def __init__(self, vllm_config=None, device: torch.device | None = None, is_pin_memory: bool = False) -> None:
        self.specs: dict[int, DecodingSpec] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        try:
            request_spec(sampling_params)
        except (UserInputError, TypeError) as error:
            raise ValueError(str(error)) from None

    def is_argmax_invariant(self) -> bool:
        return False  # it scales and cuts the logits itself: it must see them before vLLM's temperature

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.specs.pop(index, None)
        for index, params, *_ in batch_update.added:
            spec = request_spec(params)
            if spec is None:
                self.specs.pop(index, None)
            else:
                self.specs[index] = spec
        for source, target, direction in batch_update.moved:
            moved, displaced = self.specs.pop(source, None), self.specs.pop(target, None)
            if moved is not None:
                self.specs[target] = moved
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self.specs[source] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.specs:
            return logits
        return filter_rows([self.specs.get(row) for row in range(logits.shape[0])], logits)
