"""Likelihood metrics of responses, in one place: the scoring unit of the live dynamics callback, the
offline `dynamics` command, the `select` command and benchmarks/dynamics.py.

Per sample, conditioned on the prompt and scored on the response tokens (or, with `score: all`, on every
token after the first): the summed log-likelihood, the number of scored tokens, the perplexity
exp(-mean log p) and the mean full-vocabulary entropy -sum p log p over the scored positions. Prompt and
response are tokenised separately and concatenated as ids (`PromptFormatter`); the response ends with
EOS, as in training. Log-probabilities come from `teacher_forced_chunks` (fp32 log_softmax at scored
positions only). A pool is a JSON list of {"instruction", "input", "output", "type"}.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError
from core.records import read_json_records
from core.tensors import pad_sequences
from evaluation.teacher_forcing import teacher_forced_chunks
from tasks.examples import TASKS
from tasks.prompts import PromptFormatter, PromptSpec

METRICS = ("log_likelihood", "perplexity", "token_count", "entropy")


@dataclass
class ScoringSpec:
    """How responses are scored."""

    prompt: PromptSpec = field(default_factory=PromptSpec)
    """Prompt format (plain or the tokenizer's chat template); recorded in every output."""
    score: Literal["response", "all"] = "response"
    """response: the response tokens given the prompt; all: every token after the first."""
    score_eos: bool = False
    """Also score an EOS appended to the response (token_count + 1, log p(EOS) in the log-likelihood). Off: the
    response tokens only, as the likelihood-dynamics reference code (calculate_llh.py) scores them."""
    batch_size: int = 8
    """Sequences per forward pass (sorted by length, so little padding)."""
    chunk_tokens: int = 1024
    """At most this many scored positions go through the output head at a time (bounds [n, vocab] fp32)."""


@dataclass(frozen=True)
class PoolSample:
    """One pool entry: a prompt (instruction and/or input), the response to score, and its type."""

    instruction: str
    input: str
    output: str
    type: str

    @property
    def question(self) -> str:
        """The prompt text "{instruction}\\n\\n{input}" (or whichever exists), as the instruction task builds it."""
        return TASKS["instruction"].to_example(asdict(self), "").question


@dataclass
class SampleMetrics:
    log_likelihood: float
    token_count: int
    perplexity: float
    entropy: float


def load_pool(path: str | Path, types: Sequence[str] | None = None) -> list[PoolSample]:
    """The samples of a pool file (.json list or .jsonl); every bad entry is named by file and item.
    `types` keeps only those types (an unknown one is an error naming the types the pool has)."""
    records, places = read_json_records(Path(path))
    samples = []
    for record, place in zip(records, places, strict=True):
        for name in ("output", "type"):
            if not isinstance(record.get(name), str) or not record[name].strip():
                raise UserInputError(f"{place}: field '{name}' is missing or empty")
        for name in ("instruction", "input"):
            if not isinstance(record.get(name, ""), str):
                raise UserInputError(f"{place}: field '{name}' must be a string")
        if not (record.get("instruction") or record.get("input")):
            raise UserInputError(f"{place}: needs a non-empty 'instruction' or 'input' (the prompt)")
        prompt = (record.get("instruction", ""), record.get("input", ""))
        samples.append(PoolSample(*prompt, record["output"], record["type"]))
    if types:
        known = dict.fromkeys(sample.type for sample in samples)
        unknown = [name for name in types if name not in known]
        if unknown:
            raise UserInputError(f"{path}: no samples of type {', '.join(unknown)}; the pool has: {', '.join(known)}")
        samples = [sample for sample in samples if sample.type in types]
    return samples


def pool_fingerprint(samples: Sequence[PoolSample]) -> str:
    """A hash of the pool's content: outputs computed on another pool are never reused."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(repr(astuple(sample)).encode())
    return digest.hexdigest()[:16]


def settings_record(spec: ScoringSpec, samples: Sequence[PoolSample]) -> dict:
    """What makes scores comparable: written into every output and checked before reusing one."""
    return {
        "prompt": asdict(spec.prompt),
        "score": spec.score,
        "score_eos": spec.score_eos,
        "pool_sha256": pool_fingerprint(samples),
    }


def encode(
    formatter: PromptFormatter, question: str, response: str, score: str, eos: bool = False
) -> tuple[list[int], int]:
    """(ids, first scored position): prompt ids + response ids (+ EOS with `eos`), scored from the response (or
    from 1)."""
    prompt_ids = formatter.encode_prompt(question)
    response_ids = formatter.encode_response(response)  # ends with EOS
    ids = prompt_ids + (response_ids if eos else response_ids[:-1])
    return ids, (len(prompt_ids) if score == "response" else 1)


def score_sequences(
    model: PreTrainedModel,
    sequences: Sequence[tuple[list[int], int]],
    pad_id: int,
    batch_size: int = 8,
    chunk_tokens: int = 1024,
    progress: str | None = None,
) -> list[SampleMetrics]:
    """Metrics of each (ids, first scored position), in the given order. The model is used as it is."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda index: -len(sequences[index][0]))
    results: list[SampleMetrics | None] = [None] * len(sequences)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        ids = pad_sequences([sequences[index][0] for index in batch], pad_id).to(device)
        mask = pad_sequences([[1] * len(sequences[index][0]) for index in batch], 0).to(device)
        first = torch.tensor([sequences[index][1] for index in batch], device=device)
        scored = mask.bool() & (torch.arange(ids.shape[1], device=device)[None, :] >= first[:, None])
        log_likelihood = torch.zeros(len(batch), dtype=torch.float64, device=device)
        entropy, count = torch.zeros_like(log_likelihood), torch.zeros_like(log_likelihood)
        for chunk in teacher_forced_chunks(model, ids, mask, scored, chunk_tokens=chunk_tokens):
            token_log_probs = chunk.log_probs.gather(-1, chunk.targets[:, None])[:, 0]
            log_likelihood.index_add_(0, chunk.rows, token_log_probs.double())
            entropy.index_add_(0, chunk.rows, -(chunk.log_probs.exp() * chunk.log_probs).sum(-1).double())
            count.index_add_(0, chunk.rows, torch.ones_like(token_log_probs, dtype=torch.float64))
        for row, index in enumerate(batch):
            n = int(count[row])
            total = float(log_likelihood[row])
            results[index] = SampleMetrics(
                log_likelihood=total,
                token_count=n,
                perplexity=math.exp(-total / n) if n else math.nan,
                entropy=float(entropy[row]) / n if n else math.nan,
            )
    return results  # type: ignore[return-value]


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    spec: ScoringSpec,
    progress: str | None = None,
) -> list[SampleMetrics]:
    """Metrics of each (prompt text, response) pair under `model`, formatted by `spec.prompt`."""
    formatter = PromptFormatter(tokenizer, spec.prompt)
    sequences = [encode(formatter, question, response, spec.score, spec.score_eos) for question, response in pairs]
    return score_sequences(model, sequences, tokenizer.pad_token_id, spec.batch_size, spec.chunk_tokens, progress)


def score_pool(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[PoolSample],
    spec: ScoringSpec,
    progress: str | None = None,
) -> list[dict]:
    """Per-sample results [{"type", "metrics": {...}}] of the pool, in pool order."""
    metrics = score_texts(model, tokenizer, [(s.question, s.output) for s in samples], spec, progress)
    return [{"type": s.type, "metrics": asdict(m)} for s, m in zip(samples, metrics, strict=True)]


def type_averages(results: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{type: {avg_<metric>: mean over the type's samples}}, types in order of first appearance."""
    by_type: dict[str, list[dict]] = {}
    for result in results:
        by_type.setdefault(result["type"], []).append(result["metrics"])
    return {
        name: {f"avg_{metric}": sum(row[metric] for row in rows) / len(rows) for metric in METRICS}
        for name, rows in by_type.items()
    }


def build_summary(records: Sequence[dict], header: dict) -> dict:
    """The all-checkpoints summary: `header` + checkpoints, steps and, per type, one entry per checkpoint
    (avg_<metric> lists and per-sample <metric> lists); a type missing at a checkpoint gives null."""
    records = sorted(records, key=lambda record: record["step"])
    types = list(dict.fromkeys(result["type"] for record in records for result in record["results"]))
    by_type: dict[str, dict[str, list]] = {
        name: {key: [] for metric in METRICS for key in (f"avg_{metric}", metric)} for name in types
    }
    for record in records:
        averages = type_averages(record["results"])
        for name in types:
            rows = [result["metrics"] for result in record["results"] if result["type"] == name]
            for metric in METRICS:
                by_type[name][f"avg_{metric}"].append(averages[name][f"avg_{metric}"] if rows else None)
                by_type[name][metric].append([row[metric] for row in rows] if rows else None)
    return {
        **header,
        "num_checkpoints": len(records),
        "checkpoints": [record["checkpoint"] for record in records],
        "steps": [record["step"] for record in records],
        "seconds": [record.get("seconds") for record in records],
        "results_by_type": by_type,
    }


def scalar_tags(record: dict) -> dict[str, float]:
    """TensorBoard scalars of one checkpoint: dynamics/<type>/<metric> = the type's average."""
    return {
        f"dynamics/{name}/{metric}": averages[f"avg_{metric}"]
        for name, averages in type_averages(record["results"]).items()
        for metric in METRICS
    }
