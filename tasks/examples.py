"""Tasks: where each benchmark's records come from and how a record becomes an `Example`.

A record is read from a local JSON/JSONL file (validated line by line, so a bad line is reported by
file and line) or from the hub through HF `datasets`; the datamodule turns the examples into a
tokenised `datasets.Dataset` either way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import datasets

from core.errors import UserInputError
from core.records import read_json_records
from tasks.scoring import extract_boxed

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
T = TypeVar("T")


@dataclass(frozen=True)
class Example:
    """One question with its gold solution (the training target) and gold final answer."""

    id: str
    question: str
    response: str
    answer: str
    record: dict = field(default_factory=dict, compare=False, repr=False)
    """The source record as read (what `data.protocol: planning_tokens` renders from)."""
    prompt: str | None = None
    """The prompt text exactly as given by the source (lm-eval tasks); None = rendered by `data.prompt`."""


@dataclass(frozen=True)
class Task:
    """A benchmark: its answer format, its bundled files, and its record -> Example conversion."""

    name: str
    answer_format: str
    bundled: dict[str, Path]
    fields: tuple[str, ...]
    to_example: Callable[[dict, str], Example]


def _gsm8k(record: dict, row_id: str) -> Example:
    solution = record["answer"]
    if not isinstance(solution, str):
        raise UserInputError(f"field 'answer' must be text, got {solution!r:.80}")
    if "####" not in solution:
        raise UserInputError(
            "field 'answer' has no '#### <final answer>' line (GSM8K's format: the solution, then "
            "'#### 42'); without it the whole solution would be the gold answer"
        )
    answer = solution.split("####")[-1].strip()
    if not answer:
        raise UserInputError("field 'answer' has nothing after '####' (GSM8K's format: '#### 42')")
    return Example(row_id, record["question"], solution, answer)


def _math(record: dict, row_id: str) -> Example:
    """MATH-500 rows carry "answer"; MATH12K-style rows ("problem", "solution") have it as the solution's last
    \\boxed{}."""
    answer = record.get("answer") or extract_boxed(record["solution"])
    if not answer:
        raise UserInputError("no 'answer' field and no \\boxed{} answer in 'solution'")
    return Example(record.get("unique_id") or row_id, record["problem"], record["solution"], str(answer))


def _aqua(record: dict, row_id: str) -> Example:
    question = record["question"] + "\nOptions: " + " ".join(record["options"])
    response = record["rationale"].strip() + f"\nThe answer is {record['correct']}."
    return Example(row_id, question, response, record["correct"])


def _tagged(record: dict, row_id: str) -> Example:
    steps = record["steps"]
    response = "\n".join(steps) if isinstance(steps, list) else str(steps)
    return Example(str(record.get("id", row_id)), record["question"], response, str(record["answer"]))


def _multiple_choice(letters: str) -> Callable[[dict, str], Example]:
    """Tagged-step records with "choices" (a list, or {"text": [...]} as on the hub) and an answer letter: the
    prompt lists the choices with their letters ("(A) ..." a line)."""

    def to_example(record: dict, row_id: str) -> Example:
        choices = record["choices"]["text"] if isinstance(record["choices"], dict) else record["choices"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(letters):
            raise UserInputError(f"'choices' must be a list of 2 to {len(letters)} choices")
        if not all(isinstance(choice, str) and choice.strip() for choice in choices):
            raise UserInputError("'choices' must be non-empty strings")
        answer = str(record["answer"]).strip().strip("()").upper()
        if answer not in letters[: len(choices)]:
            last = letters[len(choices) - 1]
            raise UserInputError(f"'answer' {record['answer']!r} is not one of the choice letters A-{last}")
        listed = "\n".join(f"({letter}) {choice.strip()}" for letter, choice in zip(letters, choices, strict=False))
        tagged = _tagged(record, row_id)
        return Example(tagged.id, f"{record['question']}\nAnswer Choices:\n{listed}", tagged.response, answer)

    return to_example


def _instruction(record: dict, row_id: str) -> Example:
    question = "\n\n".join(part for part in (record.get("instruction"), record.get("input")) if part)
    return Example(str(record.get("id", row_id)), question, record["output"], str(record.get("answer", "")))


TASKS = {
    "gsm8k": Task(
        "gsm8k",
        "gsm8k",
        {"train": DATA_DIR / "gsm8k/train.jsonl", "test": DATA_DIR / "gsm8k/test.jsonl"},
        ("question", "answer"),
        _gsm8k,
    ),
    "math": Task("math", "math", {"test": DATA_DIR / "math500/test.jsonl"}, ("problem", "solution"), _math),
    "aqua": Task(
        "aqua", "aqua", {"test": DATA_DIR / "aqua/test.jsonl"}, ("question", "options", "rationale", "correct"), _aqua
    ),
    "instruction": Task("instruction", "gsm8k", {}, ("output",), _instruction),
    # Memory/reason data (Jin et al.): steps tagged "[rag]: ..." / "[memory]: ..." / "[reason]: ...", True/False.
    "strategyqa": Task(
        "strategyqa",
        "boolean",
        {"train": DATA_DIR / "strategyqa_tagged/train.jsonl", "test": DATA_DIR / "strategyqa_tagged/test.jsonl"},
        ("question", "steps", "answer"),
        _tagged,
    ),
    # The same tagged steps with multiple-choice questions: CommonsenseQA (A-E) and TruthfulQA MC1 (A-N).
    "commonsenseqa": Task(
        "commonsenseqa",
        "letters_a_e",
        {"train": DATA_DIR / "commonsenseqa_tagged/train.jsonl", "test": DATA_DIR / "commonsenseqa_tagged/test.jsonl"},
        ("question", "choices", "steps", "answer"),
        _multiple_choice("ABCDE"),
    ),
    "truthfulqa_mc1": Task(
        "truthfulqa_mc1",
        "letters_a_n",
        {"train": DATA_DIR / "truthfulqa_tagged/train.jsonl", "test": DATA_DIR / "truthfulqa_tagged/test.jsonl"},
        ("question", "choices", "steps", "answer"),
        _multiple_choice("ABCDEFGHIJKLMN"),
    ),
}


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name fails with the list of known ones."""
    if name not in TASKS:
        raise UserInputError(f"data.task: unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def load_examples(task: Task, source: str | None, split: str, hub_subset: str | None = None) -> list[Example]:
    """The examples of `split`: from `source` (local file or hub id) or the task's bundled file."""
    if source is None:
        if split not in task.bundled:
            raise UserInputError(
                f"data: task '{task.name}' bundles no '{split}' split (it has: "
                f"{', '.join(task.bundled) or 'none'}); give a file or hub id for it"
            )
        source = str(task.bundled[split])
    if Path(source).suffix in (".json", ".jsonl"):
        rows, places = read_json_records(Path(source))
        where = places.__getitem__
    else:
        try:
            rows = datasets.load_dataset(source, hub_subset, split=split)
        except Exception as error:  # noqa: BLE001 - datasets raises many types; report one line
            raise UserInputError(f"data: could not load '{source}' ({type(error).__name__}: {error})") from None
        where = lambda index: f"{source} row {index}"  # noqa: E731
    examples = []
    for index, record in enumerate(rows):
        missing = [field for field in task.fields if record.get(field) in (None, "")]
        if missing:
            raise UserInputError(f"{where(index)}: missing field {', '.join(repr(m) for m in missing)}")
        try:
            example = task.to_example(record, f"{split}-{index}")
        except UserInputError as error:  # a record the task cannot use: named by its place
            raise UserInputError(f"{where(index)}: {error}") from None
        examples.append(replace(example, record=dict(record)))
    return examples


def seeded_subset(items: Sequence[T], limit: int | None, seed: int = 0) -> list[T]:
    """`limit` items drawn without replacement with `random.Random(seed)`, kept in their original order (all of
    them when `limit` is None, 0 or at least their number): the one subset rule of `cli.py test
    --data.test_limit`, `traces --limit` and the inspect-ai task's `limit`, so they score the same questions."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]
