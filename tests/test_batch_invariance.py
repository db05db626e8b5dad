"""`generation.batch_invariant`: each question generated on its own, so batch size cannot change its result."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import load_frozen

from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch
from evaluation.rank_log import RankLogSpec
from models.loading import ModelSpec, load_model, load_tokenizer
from tasks.prompts import PromptSpec


def batches(tokenizer, batch_size: int, questions: int = 3, prompt: PromptSpec | None = None):
    """`test`'s own evaluation loader (prompts sorted by length) over the first GSM8K test questions."""
    data = ReasoningDataModule(tokenizer=tokenizer, prompt=prompt or PromptSpec(style="plain"),
                               test_limit=questions, eval_batch_size=batch_size)  # fmt: skip
    data.setup("test")
    return data.test_dataloader()


class ForwardInputs:
    """Every forward call's token ids, attention mask and positions, in call order."""

    def __init__(self, model) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        keys = ("input_ids", "attention_mask", "position_ids", "cache_position")
        self.calls.append({key: kwargs[key].clone() for key in keys if kwargs.get(key) is not None})


def evaluated(model, tokenizer, batch_size: int, generation: GenerationSpec):
    """Rows (id -> completions, ranks) and the forward calls of evaluating 3 questions in batches of `batch_size`."""
    spy = ForwardInputs(model)
    rows = {}
    for batch in batches(tokenizer, batch_size):
        for row in evaluate_batch(model, tokenizer, batch, generation, rank_log=RankLogSpec()):
            rows[row.id] = (row.completions, row.ranks)
    spy.handle.remove()
    return rows, spy.calls


def same_calls(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize(
    "generation",
    [
        GenerationSpec(max_new_tokens=6, batch_invariant=True),
        GenerationSpec(max_new_tokens=6, batch_invariant=True, repeats=2, decoding=DecodingSpec(temperature=1.2)),
    ],
    ids=["greedy", "sampled-repeats"],
)
def test_a_batch_of_3_runs_exactly_the_forward_calls_of_batch_size_1(tiny_llama, generation):
    """Batch-invariant evaluation of a batch of 3 feeds the model, call for call, the very tensors that 3 batches
    of 1 feed it (so any kernel, on any hardware, computes the same thing), and gives the same rows. The same
    batch without the setting feeds it other tensors (3 padded rows per call)."""
    model, tokenizer = load_frozen(tiny_llama)
    alone, alone_calls = evaluated(model, tokenizer, 1, generation)
    together, together_calls = evaluated(model, tokenizer, 3, generation)
    assert len(alone) == 3 and together == alone
    assert same_calls(together_calls, alone_calls)
    assert {call["input_ids"].shape[0] for call in alone_calls} <= {1, generation.repeats}  # a prefill, its samples
    _, padded_calls = evaluated(model, tokenizer, 3, replace(generation, batch_invariant=False))
    assert not same_calls(padded_calls, alone_calls)
    assert padded_calls[0]["input_ids"].shape[0] == 3 and not padded_calls[0]["attention_mask"].all()


def test_slot_arms_run_question_by_question(tiny_llama):
    """SLOT with batch_invariant at eval_batch_size 3: every forward call holds one question, and every arm's rows
    (completions, SLOT loss traces) are those of eval_batch_size 1."""
    from evaluation.slot import SlotArm
    from lightning_modules.slot_eval import SLOTEvaluator

    generation = GenerationSpec(max_new_tokens=6, batch_invariant=True)
    slot = SLOTEvaluator(
        ModelSpec(name=str(tiny_llama)), arms=[SlotArm(iters=0), SlotArm(iters=2)], generation=generation
    )

    def rows(batch_size: int):
        spy, slot.stage_rows = ForwardInputs(slot.model), []
        for index, batch in enumerate(batches(slot.tokenizer, batch_size)):
            slot.test_step(batch, index)
        spy.handle.remove()
        found = {(row.arm, row.id): (row.completions, row.extra["slot_loss"]) for row in slot.stage_rows}
        return found, spy.calls

    alone, alone_calls = rows(1)
    together, together_calls = rows(3)
    assert len(alone) == 6 and together == alone
    assert {call["input_ids"].shape[0] for call in together_calls} == {1}
    assert same_calls(together_calls, alone_calls)


def test_the_vllm_engine_is_refused():
    with pytest.raises(UserInputError, match="batch_invariant is for engine hf"):
        GenerationSpec(engine="vllm", batch_invariant=True)


@pytest.mark.slow
def test_bfloat16_greedy_on_the_embedded_model_does_not_move_with_the_batch():
    """The embedded model in bfloat16, greedy, 4 GSM8K questions with the embedded chat prompt: batch-invariant
    completions at eval_batch_size 4 are those of eval_batch_size 1, character for character."""
    spec = ModelSpec(dtype="bfloat16")
    model, tokenizer = load_model(spec).eval(), load_tokenizer(spec)
    generation = GenerationSpec(max_new_tokens=48, batch_invariant=True)

    def completions(batch_size: int) -> dict[str, list[str]]:
        found = {}
        for batch in batches(tokenizer, batch_size, questions=4, prompt=PromptSpec()):
            found |= {row.id: row.completions for row in evaluate_batch(model, tokenizer, batch, generation)}
        return found

    alone = completions(1)
    assert len(alone) == 4 and all(text.strip() for texts in alone.values() for text in texts)
    assert completions(4) == alone
