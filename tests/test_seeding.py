"""Sampling seeds: sample k of question q draws from its own stream, whatever batch, position or process."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from core.tensors import pad_sequences
from evaluation.decoding import DecodingSpec, filter_logits
from evaluation.generation import GenerationSpec, generate
from evaluation.seeding import SeededSampler, sample_seed, sample_seeds
from models.loading import ModelSpec, load_model, load_tokenizer

SPEC = DecodingSpec(temperature=0.9, top_k=40, min_p=0.01)
VOCAB = 200


def by_hand(seed: int, question_id: str, sample_index: int) -> int:
    """The documented rule, written out: sha256 of the JSON [seed, id, index], 8 bytes little-endian, < 2**63."""
    digest = hashlib.sha256(f'[{seed}, "{question_id}", {sample_index}]'.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def test_sample_seed_is_the_documented_hash():
    assert json.dumps([3, "gsm8k-17", 2]) == '[3, "gsm8k-17", 2]'
    for seed, question_id, index in [(0, "a", 0), (3, "gsm8k-17", 2), (12345, "q 9", 31)]:
        assert sample_seed(seed, question_id, index) == by_hand(seed, question_id, index)
    seeds = sample_seeds(7, ["x", "y"], 3)
    assert seeds == [by_hand(7, q, k) for q in ("x", "y") for k in range(3)] and len(set(seeds)) == 6


def logits_at(question_id: str, sample_index: int, step: int) -> torch.Tensor:
    """A sequence's next-token logits at `step`, a function of the sequence alone (not of its batch)."""
    generator = torch.Generator().manual_seed(by_hand(99, question_id, 1000 * step + sample_index))
    return torch.randn(VOCAB, generator=generator) * 3


def expected_tokens(question_id: str, sample_index: int, steps: int) -> list[int]:
    """Independent expectation: a generator seeded by hand, one multinomial draw per step from the rule's kept,
    renormalised distribution."""
    generator = torch.Generator().manual_seed(by_hand(0, question_id, sample_index))
    tokens = []
    for step in range(steps):
        probs = filter_logits(SPEC, logits_at(question_id, sample_index, step)[None]).softmax(-1)[0]
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


@pytest.mark.parametrize(
    "batch",
    [[("q1", 0)], [("q1", 0), ("q1", 1), ("q2", 0)], [("q3", 2), ("q2", 0), ("q1", 1), ("q1", 0)]],
    ids=["alone", "first", "shuffled"],
)
def test_each_sequence_draws_its_own_stream_whatever_the_batch(batch):
    sampler = SeededSampler(SPEC, [sample_seed(0, q, k) for q, k in batch])
    ids = torch.zeros(len(batch), 1, dtype=torch.long)
    drawn = []
    for step in range(5):
        logits = torch.stack([logits_at(q, k, step) for q, k in batch])
        out = sampler(ids, logits)
        assert (torch.isfinite(out).sum(-1) == 1).all() and out.max() == 0  # one allowed token per sequence
        drawn.append(out.argmax(-1).tolist())
    for row, (question_id, index) in enumerate(batch):
        assert [step[row] for step in drawn] == expected_tokens(question_id, index, 5)


def test_generate_gives_a_question_the_same_samples_in_any_batch(tiny_llama):
    """Tiny Llama, 3 samples per question: alone, with other questions, in another order; the global random
    state is neither used nor changed."""
    spec = ModelSpec(name=str(tiny_llama))
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    texts = {"a": "Question: Natalia sold 48 clips.", "b": "Q: 2+2?", "c": "Weng earns $12 an hour for babysitting."}
    generation = GenerationSpec(max_new_tokens=8, repeats=3, at_k=[1], decoding=DecodingSpec(temperature=1.5))

    def samples(question_ids: list[str]) -> dict[str, list[str]]:
        encoded = [tokenizer(texts[q]).input_ids for q in question_ids]
        ids = pad_sequences(encoded, tokenizer.pad_token_id, "left")
        mask = pad_sequences([[1] * len(e) for e in encoded], 0, "left")
        out = generate(model, tokenizer, ids, mask, generation, question_ids=question_ids)
        return {q: out[i * 3 : i * 3 + 3] for i, q in enumerate(question_ids)}

    state = torch.get_rng_state()
    alone = {q: samples([q])[q] for q in texts}
    assert samples(["a", "b", "c"]) == alone and samples(["c", "a"]) == {q: alone[q] for q in "ca"}
    assert torch.equal(torch.get_rng_state(), state)
    assert all(len(set(alone[q])) > 1 for q in texts)  # a random model at T = 1.5: the samples differ


def test_slot_arm_samples_as_test_does_at_batch_size_1(tiny_llama):
    """SLOT with 0 iterations on a batch of 3 (continuing from its own prefill) samples each question exactly as
    `test` samples it alone: one seeding rule for every caller of the evaluation path."""
    from datamodules.reasoning import ReasoningDataModule
    from evaluation.pipeline import evaluate_batch
    from evaluation.slot import SlotArm
    from lightning_modules.slot_eval import SLOTEvaluator
    from tasks.prompts import PromptSpec

    generation = GenerationSpec(max_new_tokens=8, decoding=DecodingSpec(temperature=1.5, top_p=0.95))
    slot = SLOTEvaluator(ModelSpec(name=str(tiny_llama)), arms=[SlotArm(iters=0)], generation=generation)

    def loader(batch_size: int):
        data = ReasoningDataModule(tokenizer=slot.tokenizer, prompt=PromptSpec(style="plain"), test_limit=3,
                                   eval_batch_size=batch_size)  # fmt: skip
        data.setup("test")
        return data.test_dataloader()

    batch = next(iter(loader(3)))
    assert len(batch["id"]) == 3
    slot.test_step(batch, 0)
    alone = {}
    for single in loader(1):
        alone |= {row.id: row.completions for row in evaluate_batch(slot.model, slot.tokenizer, single, generation)}
    assert {row.id: row.completions for row in slot.stage_rows} == alone
