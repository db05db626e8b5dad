"""Generation: batched left-padded greedy equals one-at-a-time; stop strings; padding checks."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserInputError
from core.tensors import pad_sequences
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec, cut_at_stop, generate
from models.loading import ModelSpec, load_model, load_tokenizer


@pytest.fixture(scope="module")
def llama(tiny_llama):
    spec = ModelSpec(name=str(tiny_llama))
    return load_model(spec).eval(), load_tokenizer(spec)


def encode(tokenizer, texts):
    ids = [tokenizer(text).input_ids for text in texts]
    return pad_sequences(ids, tokenizer.pad_token_id, side="left"), pad_sequences(
        [[1] * len(i) for i in ids], 0, side="left"
    )


def test_batched_greedy_equals_one_at_a_time(llama):
    model, tokenizer = llama
    prompts = ["Question: Natalia sold 48 clips.\nAnswer:", "Q: 2+2?", "Weng earns $12 an hour for babysitting."]
    spec = GenerationSpec(max_new_tokens=12)
    batched = generate(model, tokenizer, *encode(tokenizer, prompts), spec)
    single = [generate(model, tokenizer, *encode(tokenizer, [p]), spec)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) and text for text in batched)


def test_greedy_equals_manual_argmax_decoding(llama):
    model, tokenizer = llama
    ids, mask = encode(tokenizer, ["Question: how many clips?"])
    text = generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=6))[0]
    sequence = ids
    for _ in range(6):
        with torch.no_grad():
            next_id = model(sequence).logits[0, -1].argmax()
        if next_id == tokenizer.eos_token_id:
            break
        sequence = torch.cat([sequence, next_id.view(1, 1)], dim=1)
    assert text == tokenizer.decode(sequence[0, ids.shape[1] :], skip_special_tokens=True)


def test_sampling_is_seeded_and_differs_from_greedy(llama):
    model, tokenizer = llama
    ids, mask = encode(tokenizer, ["Question: a b c"] * 4)
    spec = GenerationSpec(max_new_tokens=10, decoding=DecodingSpec(temperature=1.5))
    first = generate(model, tokenizer, ids, mask, spec)
    torch.manual_seed(123)  # the global random state plays no part
    assert generate(model, tokenizer, ids, mask, spec) == first
    assert len(set(first)) > 1  # four samples of a random model at T=1.5 are not all equal
    spec.seed = 1
    assert generate(model, tokenizer, ids, mask, spec) != first


def test_stop_strings_cut_the_completion():
    assert cut_at_stop("The answer is 4.\nQuestion: next", ["Question:"]) == "The answer is 4.\n"
    assert cut_at_stop("no stop here", ["Question:"]) == "no stop here"


def test_right_padding_and_bad_specs_are_rejected(llama):
    model, tokenizer = llama
    ids = pad_sequences([[5, 6, 7], [5]], tokenizer.pad_token_id)
    mask = pad_sequences([[1, 1, 1], [1]], 0)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=2))
    with pytest.raises(UserInputError):
        GenerationSpec(max_new_tokens=0)
    with pytest.raises(UserInputError):
        DecodingSpec(temperature=-1)
    with pytest.raises(UserInputError):
        GenerationSpec(max_new_tokens=4, min_new_tokens=5)


def test_the_models_own_generation_defaults_are_not_inherited(tiny_llama):
    model = load_model(ModelSpec(name=str(tiny_llama))).eval()
    tokenizer = load_tokenizer(ModelSpec(name=str(tiny_llama)))
    ids, mask = encode(tokenizer, ["Question: Natalia sold 48 clips.\nAnswer:"])
    plain = generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=12))
    model.generation_config.repetition_penalty = 5.0  # as a model's generation_config.json may ship
    model.generation_config.no_repeat_ngram_size = 1
    assert generate(model, tokenizer, ids, mask, GenerationSpec(max_new_tokens=12)) == plain
