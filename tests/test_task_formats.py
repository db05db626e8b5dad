"""Task formats of the seeds: MATH12K-style rows (gold answer from the last \\boxed{}), multiple-choice
memory/reason tasks (CommonsenseQA A-E, TruthfulQA MC1 A-N) and their letter scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import UserInputError
from tasks.examples import TASKS, load_examples

REPO = Path(__file__).resolve().parents[1]
MATH500 = REPO / "data/math500/test.jsonl"
UNEQUAL_MATH500_IDS: dict[str, str] = {}
"""MATH-500 ids whose last \\boxed{} cannot equal the `answer` field, with the reason: none (checked below)."""


def math500_rows() -> list[dict]:
    return [json.loads(line) for line in MATH500.read_text(encoding="utf-8").splitlines()]


def test_math12k_rows_take_the_gold_answer_from_the_last_boxed_of_every_math500_solution(tmp_path):
    rows = math500_rows()
    stripped = tmp_path / "math12k_style.jsonl"  # MATH12K's fields: problem and solution, no "answer"
    stripped.write_text("".join(json.dumps({"problem": r["problem"], "solution": r["solution"]}) + "\n" for r in rows))
    examples = load_examples(TASKS["math"], str(stripped), "train")
    assert len(examples) == len(rows) == 500
    unequal = {
        row["unique_id"]: (example.answer, row["answer"])
        for row, example in zip(rows, examples, strict=True)
        if example.answer != row["answer"]
    }
    assert set(unequal) == set(UNEQUAL_MATH500_IDS), unequal
    assert [e.question for e in examples] == [r["problem"] for r in rows]
    assert [e.response for e in examples] == [r["solution"] for r in rows]


def test_math_rows_keep_their_answer_field_and_nested_boxes(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [
        {"problem": "p1", "solution": "First $\\boxed{1}$, then $\\boxed{\\frac{1}{2}}$."},
        {"problem": "p2", "solution": "So \\boxed{7}.", "answer": "7.0"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [e.answer for e in load_examples(TASKS["math"], str(path), "train")] == ["\\frac{1}{2}", "7.0"]


def test_a_math_row_without_a_boxed_answer_is_one_error_naming_file_and_line(tmp_path):
    path = tmp_path / "math12k.jsonl"
    path.write_text(
        json.dumps({"problem": "1+1?", "solution": "It is $\\boxed{2}$."})
        + "\n"
        + json.dumps({"problem": "2+2?", "solution": "It is 4."})
        + "\n"
    )
    with pytest.raises(UserInputError) as error:
        load_examples(TASKS["math"], str(path), "train")
    assert str(error.value) == f"{path}:2: no 'answer' field and no \\boxed{{}} answer in 'solution'"
