"""The scoring unit: per-sample metrics equal a direct computation; the prompt/response boundary; pools."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import build_tiny_model
from transformers import AutoTokenizer

from core.errors import UserInputError
from evaluation.likelihood import PoolSample, ScoringSpec, build_summary, load_pool, score_pool
from models.loading import ModelSpec, resolve_model_path
from tasks.prompts import PromptFormatter, PromptSpec

POOL = [
    {"instruction": "Solve.", "input": "Tom has 3 apples, buys 4 more. How many?", "output": "3 + 4 = 7", "type": "a"},
    {"instruction": "", "input": "What is 2 times 8?", "output": "2 * 8 = 16 so the answer is 16", "type": "b"},
    {"instruction": "Add the numbers.", "input": "", "output": "It is 12.", "type": "a"},
]


def direct_metrics(model, ids: list[int], first: int) -> dict:
    """Independent reference: one unpadded sequence through the whole model, logits at every position."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    probs = torch.softmax(logits, -1)
    token_log_probs, entropies = [], []
    for position in range(first, len(ids)):
        p = probs[position - 1]
        token_log_probs.append(math.log(p[ids[position]]))
        entropies.append(float(-(p * p.log()).sum()))
    n = len(token_log_probs)
    return {
        "log_likelihood": sum(token_log_probs),
        "token_count": n,
        "perplexity": math.exp(-sum(token_log_probs) / n),
        "entropy": sum(entropies) / n,
    }


@pytest.mark.parametrize("score_eos", [False, True])
@pytest.mark.parametrize("score", ["response", "all"])
@pytest.mark.parametrize("style", ["plain", "chat"])
def test_metrics_equal_a_direct_per_sample_computation(tiny_tokenizer, score, style, score_eos):
    """By default the response tokens alone are scored (the reference's calculate_llh.py); `score_eos` adds EOS."""
    model = build_tiny_model("llama", len(tiny_tokenizer)).eval()
    samples = [PoolSample(**row) for row in POOL]
    spec = ScoringSpec(prompt=PromptSpec(style=style), score=score, score_eos=score_eos, batch_size=2, chunk_tokens=7)
    results = score_pool(model, tiny_tokenizer, samples, spec)
    for sample, result in zip(samples, results, strict=True):
        question = "\n\n".join(part for part in (sample.instruction, sample.input) if part)
        if style == "plain":
            prompt = tiny_tokenizer(f"Question: {question}\nAnswer:").input_ids
            response = tiny_tokenizer(" " + sample.output, add_special_tokens=False).input_ids
        else:
            text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            prompt = tiny_tokenizer(text, add_special_tokens=False).input_ids
            response = tiny_tokenizer(sample.output, add_special_tokens=False).input_ids
        ids = prompt + response + ([tiny_tokenizer.eos_token_id] if score_eos else [])
        expected = direct_metrics(model, ids, len(prompt) if score == "response" else 1)
        assert result["type"] == sample.type
        assert result["metrics"]["token_count"] == expected["token_count"]
        for metric in ("log_likelihood", "perplexity", "entropy"):
            assert result["metrics"][metric] == pytest.approx(expected[metric], rel=1e-4, abs=1e-4), metric


def test_the_boundary_is_right_where_bpe_merges_across_the_join():
    """SmolLM2's tokenizer merges the chat prompt's final newline with a response that starts with newlines:
    tokenising prompt+response together and slicing at the prompt's length scores the wrong tokens."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelSpec().name))
    formatter = PromptFormatter(tokenizer, PromptSpec(style="chat"))
    question, response = "How many clips did she sell?", "\n\nShe sold 48 clips."
    prompt_ids, response_ids = formatter.encode_prompt(question), formatter.encode_response(response)
    joint = tokenizer(formatter.prompt_text(question) + response, add_special_tokens=False).input_ids
    assert joint[: len(prompt_ids)] != prompt_ids  # precondition: BPE merges across the join here
    model = build_tiny_model("llama", len(tokenizer), hidden_size=16, intermediate_size=32).eval()
    spec = ScoringSpec(score_eos=True)
    (result,) = score_pool(model, tokenizer, [PoolSample("", question, response, "t")], spec)
    expected = direct_metrics(model, prompt_ids + response_ids, len(prompt_ids))
    assert result["metrics"]["token_count"] == len(response_ids) == expected["token_count"]
    assert result["metrics"]["log_likelihood"] == pytest.approx(expected["log_likelihood"], rel=1e-4)
    upstream_count = len(tokenizer(formatter.prompt_text(question) + response + tokenizer.eos_token).input_ids)
    assert upstream_count - len(prompt_ids) != len(response_ids)  # the upstream slice would be off


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"instruction": "x", "input": "q", "type": "a"}, "field 'output' is missing or empty"),
        ({"instruction": "x", "input": "q", "output": "  ", "type": "a"}, "field 'output' is missing or empty"),
        ({"instruction": "x", "input": "q", "output": "o"}, "field 'type' is missing or empty"),
        ({"instruction": "", "input": "", "output": "o", "type": "a"}, "non-empty 'instruction' or 'input'"),
        ({"instruction": 3, "input": "q", "output": "o", "type": "a"}, "'instruction' must be a string"),
    ],
)
def test_bad_pool_entries_are_named_by_item(tmp_path, row, message):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps([POOL[0], row]))
    with pytest.raises(UserInputError, match=f"pool.json item 1: .*{message}"):
        load_pool(path)


def test_type_filter_and_unknown_types(tmp_path):
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(POOL))
    assert [sample.type for sample in load_pool(path, ["b"])] == ["b"]
    with pytest.raises(UserInputError, match="no samples of type zzz; the pool has: a, b"):
        load_pool(path, ["a", "zzz"])


def test_summary_gives_null_for_a_type_missing_at_a_checkpoint():
    metrics = {"log_likelihood": -2.0, "perplexity": 2.0, "token_count": 2, "entropy": 1.0}
    records = [
        {"checkpoint": "checkpoint-10", "step": 10, "results": [{"type": "a", "metrics": metrics}]},
        {"checkpoint": "base_model", "step": 0, "results": [{"type": "b", "metrics": metrics}] * 2},
    ]
    summary = build_summary(records, {"model_folder": "x"})
    assert summary["checkpoints"] == ["base_model", "checkpoint-10"] and summary["steps"] == [0, 10]
    assert summary["results_by_type"]["b"]["avg_perplexity"] == [2.0, None]
    assert summary["results_by_type"]["b"]["perplexity"] == [[2.0, 2.0], None]
    assert summary["results_by_type"]["a"]["avg_log_likelihood"] == [None, -2.0]
