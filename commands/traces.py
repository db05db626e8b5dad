"""`python cli.py traces`: top-k traces of a frozen model over a dataset's gold responses (calibration input).

One teacher-forced pass per batch (evaluation/teacher_forcing.py): for every response token, the gold
token id and the model's k most likely next tokens with their probabilities. One JSONL line per scored
position, examples in order, positions left to right:
    {"gt": 1234, "top_ids": [1234, 17, ...], "top_probs": ["0.93210000", "0.02130000", ...]}
"""

from __future__ import annotations

import gzip
import io
import random
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from core.errors import UserInputError
from core.io import atomic_path
from datamodules.batching import collate
from evaluation.teacher_forcing import teacher_forced_chunks
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.examples import get_task, load_examples
from tasks.prompts import PromptFormatter, PromptSpec


def open_text(path: Path, mode: str, name: Path | None = None) -> io.TextIOBase:
    """A text file, gzip-compressed when its name (`name`, else `path`) ends in .gz."""
    if (name or path).suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def trace_lines(targets: torch.Tensor, log_probs: torch.Tensor, k: int) -> list[str]:
    """The JSONL lines of scored positions: gold id, top-k ids and top-k probabilities (8 decimals)."""
    top_log_probs, top_ids = log_probs.topk(k, dim=-1)
    probs = top_log_probs.exp().cpu().tolist()
    ids = top_ids.cpu().tolist()
    lines = []
    for gt, row_ids, row_probs in zip(targets.cpu().tolist(), ids, probs, strict=True):
        quoted = '", "'.join(f"{p:.8f}" for p in row_probs)  # the same text json.dumps would write, faster
        lines.append(f'{{"gt": {gt}, "top_ids": {row_ids}, "top_probs": ["{quoted}"]}}\n')
    return lines


def write_traces(
    network: PreTrainedModel,
    pad_id: int,
    features: list[dict],
    file: io.TextIOBase,
    k: int,
    batch_size: int,
    chunk_tokens: int = 1024,
) -> int:
    """Trace lines of `features` ({"input_ids", "labels"}: scored where labels != -100) into `file`; positions."""
    device, positions = next(network.parameters()).device, 0
    for start in tqdm(range(0, len(features), batch_size), desc="traces", unit="batch"):
        batch = collate(features[start : start + batch_size], pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        scored = batch["labels"].to(device) != -100
        for chunk in teacher_forced_chunks(network, ids, mask, scored, chunk_tokens=chunk_tokens):
            file.writelines(trace_lines(chunk.targets, chunk.log_probs, k))
            positions += len(chunk.targets)
    return positions


def traces(
    output: str,
    model: ModelSpec | None = None,
    checkpoint: str | None = None,
    task: str = "gsm8k",
    data_path: str | None = None,
    split: str = "train",
    prompt: PromptSpec | None = None,
    limit: int | None = 200,
    seed: int = 0,
    k: int = 20,
    batch_size: int = 8,
    max_length: int = 1024,
    chunk_tokens: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Write top-k traces of a frozen model's teacher-forced pass over gold responses.

    Args:
        output: the JSONL file to write (gzip-compressed when it ends in .gz).
        model: the model (alias, folder, GGUF file or hub id) and how to load it.
        checkpoint: a fine-tuned model to trace instead (an epoch_N export or a Lightning checkpoint on `model`).
        task: gsm8k | math | aqua | instruction.
        data_path: a .json/.jsonl file or hub id; None = the task's bundled file of `split`.
        split: which split (train or test).
        prompt: how questions become prompts (as in the experiment config's data.prompt).
        limit: trace this many examples (seeded subset); None = all.
        seed: seed of the subset.
        k: how many top tokens per position.
        batch_size: examples per forward pass.
        max_length: longest sequence (prompt + response) in tokens; longer ones are truncated.
        chunk_tokens: positions per output-head chunk (bounds the [positions, vocab] memory).
        overwrite: replace an existing `output` (otherwise an existing file is kept and nothing is recomputed).
    """
    path, model_spec = Path(output), model or ModelSpec()
    if not isinstance(k, int) or k < 1:
        raise UserInputError(f"traces: k must be an integer >= 1, got {k}")
    if path.exists() and not overwrite:
        print(f"{path} exists: kept (--overwrite true to recompute)")
        return path
    examples = load_examples(get_task(task), data_path, split)
    if limit is not None and limit < len(examples):
        examples = [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), limit))]
    trained = load_trained(model_spec, checkpoint)
    tokenizer, network = trained.tokenizer, trained.model.requires_grad_(False)
    formatter = PromptFormatter(tokenizer, prompt or PromptSpec())
    if torch.cuda.is_available():
        network = network.cuda()
    if k > network.config.vocab_size:
        raise UserInputError(f"traces: k={k} is larger than the vocabulary ({network.config.vocab_size})")
    features = []
    for example in examples:
        input_ids, labels = formatter.encode_example(example.question, example.response)
        features.append({"input_ids": input_ids[:max_length], "labels": labels[:max_length]})
    with atomic_path(path) as temporary, open_text(temporary, "w", name=path) as file:
        positions = write_traces(network, tokenizer.pad_token_id, features, file, k, batch_size, chunk_tokens)
    print(f"Top-{k} traces of {positions} positions ({len(examples)} examples): {path}")
    return path
