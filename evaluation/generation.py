"""Generation, in one place: batched, left-padded, greedy or sampled, stopping at EOS.

Validation accuracy, `test`, `predict`, SLOT and the decoding studies all generate through
`generate`, so a result never differs because two paths decode differently.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import torch
from transformers import (
    Cache,
    DynamicCache,
    GenerationConfig,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.errors import UserInputError
from evaluation.decoding import DecodingSpec
from evaluation.rank_log import RankRecorder
from evaluation.seeding import SeededSampler, sample_seeds

log = logging.getLogger(__name__)


@dataclass
class VllmSettings:
    """Settings of the vLLM engine (`generation.engine: vllm`); ignored by the HF engine."""

    tensor_parallel_size: int = 1
    """GPUs the model is split over. Data parallelism: trainer.devices (each process runs its own engine; vLLM's
    offline engine takes no data_parallel_size)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM reserves (on vLLM's CPU backend: of host RAM; use ~0.3 there)."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens (None = the model's own limit)."""
    dtype: str = "model"
    """Weights and activations: model (the evaluated model's own, as the HF engine runs it), auto (vLLM's choice:
    bfloat16 for a float32 model), float32, bfloat16 or float16."""
    enforce_eager: bool = False
    """Skip graph capture / compilation (faster start, slower decoding)."""
    cpu_kv_cache_gib: int = 4
    """vLLM's CPU backend only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE, unless already set)."""

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "cpu_kv_cache_gib"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserInputError(f"generation.vllm.{name} must be an integer >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise UserInputError(
                f"generation.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise UserInputError(f"generation.vllm.max_model_len must be >= 1 or null, got {self.max_model_len}")
        if self.dtype not in VLLM_DTYPES:
            raise UserInputError(f"generation.vllm.dtype must be one of {', '.join(VLLM_DTYPES)}, got {self.dtype}")


VLLM_DTYPES = ("model", "auto", "float32", "bfloat16", "float16")


@dataclass
class GenerationSpec:
    """How completions are generated: length, decoding rule (greedy by default), stop strings."""

    max_new_tokens: int = 256
    """Longest completion in tokens."""
    min_new_tokens: int = 0
    """Shortest completion in tokens (EOS is suppressed before it; e.g. to force equal lengths)."""
    decoding: DecodingSpec = field(default_factory=lambda: DecodingSpec(temperature=0.0))
    """How each token is chosen: temperature 0 = greedy (the default); every sampling knob (top_k, top_p,
    min_p, epsilon/eta, greedy_threshold, dynamic_top_k, EDT, confidence bins, calibrated cut-offs) is in
    evaluation/decoding.py."""
    stop: list[str] = field(default_factory=list)
    """Extra stop strings; the completion is cut before the first one (EOS always stops)."""
    repeats: int = 1
    """Samples per question (> 1 needs sampling, temperature > 0); evaluation then reports maj@k and pass@k."""
    at_k: list[int] = field(default_factory=lambda: [1, 8, 16, 32])
    """The k of maj@k (majority vote over the first k samples) and pass@k (unbiased estimator), k <= repeats."""
    engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers' generate; vllm: vLLM (paged attention, continuous batching; `pip install -e '.[vllm]'`),
    for `test` and `predict` only: SLOT arms and fit's in-loop validation need hf. Same prompt ids, decoding
    rules, stop strings, scoring and rows; settings in `vllm`."""
    vllm: VllmSettings = field(default_factory=VllmSettings)
    """Engine settings of `engine: vllm` (tensor parallelism, memory fraction, max model length, dtype)."""
    batch_invariant: bool = False
    """Generate each question on its own (its samples together, its prompt without padding): every completion is
    then bitwise what eval_batch_size 1 gives, whatever the batch size, process count or test_limit, on any
    hardware with deterministic kernels. Costs the batching of questions (greedy runs one prompt at a time).
    Without it, float32 greedy results were unchanged at batch 4/8/16 here, bfloat16 ones were not (README,
    "Results that do not depend on how the work is split"). HF engine only."""
    seed: int = 0
    """Seed of sampling: sample k of question q draws from its own stream, seeded by (seed, q, k)
    (evaluation/seeding.py), so a question's samples depend on neither its batch, nor the process evaluating it,
    nor the other questions; the training random stream is left untouched."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserInputError(f"generation.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise UserInputError("generation.min_new_tokens must be between 0 and max_new_tokens")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise UserInputError(f"generation.repeats must be an integer >= 1, got {self.repeats}")
        if self.repeats > 1 and self.decoding.greedy:
            raise UserInputError("generation.repeats > 1 needs sampling: set generation.decoding.temperature > 0")
        if not self.at_k or any(not isinstance(k, int) or k < 1 for k in self.at_k):
            raise UserInputError(f"generation.at_k must list integers >= 1, got {self.at_k}")
        if self.engine not in ("hf", "vllm"):
            raise UserInputError(f"generation.engine must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm" and self.batch_invariant:
            raise UserInputError(
                "generation.batch_invariant is for engine hf: vLLM schedules its own batches (set engine: hf)"
            )
        if self.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserInputError(
                "generation.engine=vllm needs vLLM, which is not installed: pip install -e '.[vllm]' (or use hf)"
            )

    def require_hf(self, where: str) -> None:
        """One clear error where only the HF engine works (SLOT arms, fit's in-loop validation)."""
        if self.engine != "hf":
            raise UserInputError(f"{where} generates with the HF engine only: set generation.engine: hf there")


# transformers fills every GenerationConfig field left unset from the model's generation_config.json (Qwen
# instruct models ship a repetition penalty, for one): these are pinned so that `spec` alone decides.
NOT_INHERITED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0}


def generation_config(
    spec: GenerationSpec, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> GenerationConfig:
    """A GenerationConfig decided by `spec` alone. It never samples: greedy decoding is its argmax, and sampling is
    `SeededSampler`'s draw (the only finite logit), so none of HF's own warpers or random state is involved."""
    return GenerationConfig(
        max_new_tokens=spec.max_new_tokens,
        min_new_tokens=spec.min_new_tokens or None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_token_ids(model, tokenizer),
        stop_strings=spec.stop or None,
        do_sample=False,
        **NOT_INHERITED,
    )


@cache
def announce_engine(engine: str, dtype: str, why: str = "the model's") -> None:
    """Log (once per process and setting) the engine and dtype that generate the completions."""
    log.info("generation: engine %s in %s (%s)", engine, dtype, why)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end a completion, for every engine: the model's generation config's and the tokenizer's."""
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    eos_ids.add(tokenizer.eos_token_id)
    return sorted(eos_ids - {None})


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    spec: GenerationSpec,
    logits_processor: LogitsProcessorList | None = None,
    past_key_values: Cache | None = None,
    rank_recorder: RankRecorder | None = None,
    question_ids: Sequence[str] | None = None,
) -> list[str]:
    """Completions (text after the prompt, special tokens and stop strings removed) of a left-padded batch.

    With `spec.repeats` = n > 1 every prompt is prefilled once and its cache and ids repeated n times
    (repeat_interleave, one batched sampling call): the result has n * batch completions, question i's samples
    at i*n .. i*n + n - 1.
    `past_key_values` may hold a prefill of all but the last prompt tokens (positions from the mask's
    cumulative sum, as `generate` counts them): generation then continues from it without a second prefill.
    `rank_recorder` logs the rank of every chosen token under the model's raw distribution (rank_log.py).
    Sampling seeds sample k of prompt i with (spec.seed, question_ids[i], k) (None: the ids are "0", "1", ...).
    """
    if prompt_ids.shape[1] and bool((prompt_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left-padded prompts (the last column is padding)")
    question_ids = [str(i) for i in range(len(prompt_ids))] if question_ids is None else list(question_ids)
    if len(question_ids) != len(prompt_ids):
        raise ValueError(f"generate got {len(question_ids)} question ids for {len(prompt_ids)} prompts")
    seeds = sample_seeds(spec.seed, question_ids, spec.repeats)
    sampler = [] if spec.decoding.greedy else [SeededSampler(spec.decoding, seeds)]
    if spec.repeats > 1:
        if past_key_values is None and prompt_ids.shape[1] > 1:  # each prompt is prefilled once, not n times
            past_key_values = prefill_cache(model, prompt_ids, prompt_mask)
        if past_key_values is not None:
            past_key_values.batch_repeat_interleave(spec.repeats)
        prompt_ids = prompt_ids.repeat_interleave(spec.repeats, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(spec.repeats, dim=0)
    extra = {"tokenizer": tokenizer} if spec.stop else {}  # stop strings are matched through it
    config = generation_config(spec, model, tokenizer)
    recorder = [rank_recorder] if rank_recorder is not None else []  # first: it sees the raw logits
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        generation_config=config,
        logits_processor=LogitsProcessorList([*recorder, *(logits_processor or []), *sampler]),
        past_key_values=past_key_values,
        **extra,
    )
    new_tokens = output[:, prompt_ids.shape[1] :]
    if rank_recorder is not None:
        ended_by_stop = (lambda tokens: any(s in tokenizer.decode(tokens) for s in spec.stop)) if spec.stop else None
        rank_recorder.finish(new_tokens, config.eos_token_id, tokenizer.pad_token_id, ended_by_stop)
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [cut_at_stop(text, spec.stop) for text in completions]


@torch.no_grad()
def prefill_cache(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> DynamicCache:
    """The KV cache of all but the last token of left-padded prompts (positions numbered as `generate` does)."""
    ids, mask = prompt_ids[:, :-1], prompt_mask[:, :-1]
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
          logits_to_keep=1)  # fmt: skip
    return cache


def cut_at_stop(text: str, stop: list[str]) -> str:
    """`text` up to (not including) the first of the stop strings."""
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]
