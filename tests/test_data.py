"""Data: tasks, bad files, prompts, loss masks, seeded subsets, length-grouped batches."""

from __future__ import annotations

import json
import random

import pytest

from core.errors import UserInputError
from core.tensors import pad_sequences
from datamodules.batching import EpochSeededRandomSampler, LengthGroupedBatchSampler
from datamodules.reasoning import ReasoningDataModule
from tasks.examples import TASKS, load_examples
from tasks.prompts import PromptFormatter, PromptSpec


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundled_tasks_load_with_gold_answers():
    counts = {"gsm8k": (7473, 1319), "math": (None, 500), "aqua": (None, 254)}
    for name, (train, test) in counts.items():
        task = TASKS[name]
        assert len(load_examples(task, None, "test")) == test
        if train:
            examples = load_examples(task, None, "train")
            assert len(examples) == train and examples[0].answer == "72"
    aqua = load_examples(TASKS["aqua"], None, "test")[0]
    assert "Options: A)" in aqua.question and aqua.answer in "ABCDE"


def test_malformed_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"question": "q", "answer": "#### 1"}', "", "{not json"])
    with pytest.raises(UserInputError, match=r"bad\.jsonl:3: invalid JSON"):
        load_examples(TASKS["gsm8k"], str(path), "train")


def test_missing_field_is_named_with_its_line(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"question": "q", "answer": "#### 1"}', '{"question": "q2"}'])
    with pytest.raises(UserInputError, match=r"x\.jsonl:2: missing field 'answer'"):
        load_examples(TASKS["gsm8k"], str(path), "train")


def test_empty_file_and_missing_split_are_errors(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [""])
    with pytest.raises(UserInputError, match="empty"):
        load_examples(TASKS["gsm8k"], str(path), "train")
    with pytest.raises(UserInputError, match="bundles no 'train' split"):
        load_examples(TASKS["math"], None, "train")


def test_instruction_format_from_json_list(tmp_path):
    records = [
        {"instruction": "Add.", "input": "2+2", "output": "2+2=4. The answer is 4."},
        {"instruction": "Hi", "output": "5"},
    ]
    path = tmp_path / "inst.json"
    path.write_text(json.dumps(records))
    examples = load_examples(TASKS["instruction"], str(path), "train")
    assert examples[0].question == "Add.\n\n2+2" and examples[1].question == "Hi"


def test_plain_prompt_masks_the_prompt_and_ends_with_eos(tiny_tokenizer):
    formatter = PromptFormatter(tiny_tokenizer, PromptSpec(style="plain"))
    ids, labels = formatter.encode_example("What is 2+2?", "2+2=4\n#### 4")
    prompt = formatter.encode_prompt("What is 2+2?")
    assert ids[: len(prompt)] == prompt  # prompt and response are concatenated as ids
    assert labels[: len(prompt)] == [-100] * len(prompt) and labels[len(prompt) :] == ids[len(prompt) :]
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True) == " 2+2=4\n#### 4"


def test_chat_prompt_uses_the_template_and_system_prompt(tiny_tokenizer):
    formatter = PromptFormatter(tiny_tokenizer, PromptSpec(style="chat", system_prompt="Be brief."))
    text = formatter.prompt_text("Q?")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(UserInputError, match="question"):
        PromptFormatter(tiny_tokenizer, PromptSpec(style="plain", template="no placeholder"))


def make_datamodule(tokenizer, **overrides) -> ReasoningDataModule:
    settings = dict(task="gsm8k", tokenizer=tokenizer, val_size=16, train_limit=64, test_limit=32, max_length=1024)
    settings.update(overrides)
    return ReasoningDataModule(**settings)


def test_subsets_are_seeded_disjoint_and_without_replacement(tiny_tokenizer):
    first, second, other = (make_datamodule(tiny_tokenizer, seed=s) for s in (0, 0, 1))
    for dm in (first, second, other):
        dm.setup("fit")
        dm.setup("test")
    train_ids, val_ids = first.splits["train"]["id"], first.splits["val"]["id"]
    assert len(set(train_ids)) == 64 and len(set(val_ids)) == 16 and not set(train_ids) & set(val_ids)
    assert train_ids == second.splits["train"]["id"] and train_ids != other.splits["train"]["id"]
    test_ids = first.splits["test"]["id"]
    assert len(set(test_ids)) == 32 and all(i.startswith("test-") for i in test_ids)


def test_eval_batches_carry_left_padded_prompts_and_gold(tiny_tokenizer):
    dm = make_datamodule(tiny_tokenizer, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["answer_format"] == "gsm8k" and len(batch["answer"]) == 4
    assert (batch["prompt_mask"][:, -1] == 1).all()  # left padded: the last column is real
    assert batch["input_ids"].shape == batch["labels"].shape


def test_too_long_prompt_and_bad_sizes_are_errors(tiny_tokenizer):
    with pytest.raises(UserInputError, match="max_length"):
        dm = make_datamodule(tiny_tokenizer, max_length=8)
        dm.setup("test")
    with pytest.raises(UserInputError, match="batch_size"):
        make_datamodule(tiny_tokenizer, batch_size=0)
    with pytest.raises(UserInputError, match="pack_length"):
        make_datamodule(tiny_tokenizer, pack_length=0)


def test_length_grouped_batches_cover_everything_once_with_less_padding():
    lengths = [(i * 37) % 200 + 10 for i in range(400)]
    sampler = EpochSeededRandomSampler(lengths, seed=0)
    batches = list(LengthGroupedBatchSampler(sampler, 8, drop_last=False, lengths=lengths, group_size=16))
    assert sorted(i for b in batches for i in b) == list(range(400))

    def padded(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) for b in batch_list)

    plain = [list(range(400))[i : i + 8] for i in range(0, 400, 8)]
    plain_shuffled = [[list(sampler)[j] for j in range(i, min(i + 8, 400))] for i in range(0, 400, 8)]
    assert padded(batches) < 0.8 * padded(plain_shuffled)
    assert padded(plain) > 0  # sanity: a non-empty baseline
    sampler.set_epoch(1)  # the same group size: only the epoch differs
    assert list(LengthGroupedBatchSampler(sampler, 8, False, lengths=lengths, group_size=16)) != batches
    sampler.set_epoch(0)
    assert list(LengthGroupedBatchSampler(sampler, 8, False, lengths=lengths, group_size=16)) == batches


def test_pad_sequences_sides():
    assert pad_sequences([[1, 2], [3]], 0).tolist() == [[1, 2], [3, 0]]
    assert pad_sequences([[1, 2], [3]], 0, side="left").tolist() == [[1, 2], [0, 3]]


def test_inspect_task_limit_takes_the_questions_test_limit_takes(tiny_tokenizer, tmp_path):
    """`cli.py test --data.test_limit N` and the inspect-ai task's `limit: N` score the same questions."""
    inspect_task = pytest.importorskip("integrations.inspect_task")
    records = [json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) for i in range(20)]
    data = write_lines(tmp_path / "test.jsonl", records)
    expected = [f"test-{i}" for i in sorted(random.Random(3).sample(range(20), 5))]
    assert expected != [f"test-{i}" for i in range(5)]  # a seeded subset, not the first five
    datamodule = make_datamodule(tiny_tokenizer, test_path=str(data), test_limit=5, seed=3)
    datamodule.setup("test")
    task = inspect_task.reasoning(data_path=str(data), limit=5, seed=3)
    assert [example.id for example in datamodule.test_examples] == expected
    assert [sample.id for sample in task.dataset] == expected
    assert [sample.target for sample in task.dataset] == [e.answer for e in datamodule.test_examples]
    default = make_datamodule(tiny_tokenizer, test_path=str(data), test_limit=5)  # both default to seed 0
    default.setup("test")
    assert [s.id for s in inspect_task.reasoning(data_path=str(data), limit=5).dataset] == [
        e.id for e in default.test_examples
    ]
