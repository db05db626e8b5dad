"""Task formats of the upstream code: MATH12K-style rows (gold answer from the last \\boxed{}), multiple-choice
memory/reason tasks (CommonsenseQA A-E, TruthfulQA MC1 A-N) and their letter scoring."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, run_main

from core.errors import UserInputError
from tasks.examples import TASKS, load_examples
from tasks.planning import ANSWER_LINE, tagged_steps
from tasks.scoring import get_answer_format, score_completion

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


# ------------------------------------------------------------------------------- multiple-choice memory/reason

MULTIPLE_CHOICE = {"commonsenseqa": ("letters_a_e", "ABCDE"), "truthfulqa_mc1": ("letters_a_n", "ABCDEFGHIJKLMN")}


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("[reason]: so it is the fridge. The answer is: B", "B"),
        ("The answer is (C).", "C"),
        ("Option a looks good, but the answer is E", "E"),  # the last answer phrase wins
        ("We get \\boxed{D}", "D"),
        ("The fridge keeps it cold.\nThus A", "A"),
        ("The answer is: F", None),  # outside A-E
        ("no letter at all", None),
    ],
)
def test_a_to_e_letters(completion, expected):
    assert get_answer_format("letters_a_e").extract(completion) == expected


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("[reason]: Mercury is closest. The answer is: N", "N"),
        ("So the answer is (K).", "K"),
        ("The correct option is M", "M"),
        ("Answer: F", "F"),
        ("It must be \\boxed{J}", "J"),
        ("(O) is wrong and (N) fits", "N"),  # O is past N
        ("Thus G", "G"),
        ("no letter at all", None),
    ],
)
def test_a_to_n_letters(completion, expected):
    assert get_answer_format("letters_a_n").extract(completion) == expected


def test_letter_scoring_is_case_insensitive_and_exact():
    assert score_completion("letters_a_n", "The answer is: K", "k") == ("K", True)  # a lower-case gold letter
    assert score_completion("letters_a_n", "The answer is: J", "K") == ("J", False)
    assert score_completion("letters_a_e", "The answer is (b)", "B") == (None, False)  # letters are capitals
    assert score_completion("letters_a_e", "nothing", "B") == (None, False)


@pytest.mark.parametrize("task", MULTIPLE_CHOICE)
def test_multiple_choice_fixtures_load_with_lettered_prompts_tagged_steps_and_gold_letters(task):
    answer_format, letters = MULTIPLE_CHOICE[task]
    assert TASKS[task].answer_format == answer_format
    train, test = (load_examples(TASKS[task], None, split) for split in ("train", "test"))
    assert (len(train), len(test)) == (24, 6)
    rows = [json.loads(line) for split in ("train", "test") for line in TASKS[task].bundled[split].open()]
    for row, example in zip(rows, train + test, strict=True):
        listed = "\n".join(f"({letters[i]}) {choice}" for i, choice in enumerate(row["choices"]))
        assert example.question == f"{row['question']}\nAnswer Choices:\n{listed}"
        assert example.answer == row["answer"] and example.answer in letters[: len(row["choices"])]
        steps, types = tagged_steps(example.response, example.id)
        assert len(steps) == len(row["steps"]) and {key for t in types for key in t} <= {"memory", "reason"}
        planned = "\n".join(steps) + ANSWER_LINE.format(answer=example.answer)  # the answer line training adds
        assert score_completion(answer_format, planned, example.answer) == (example.answer, True)
    assert len({example.answer for example in train + test}) >= 5  # the answers are spread over the letters
    assert (TASKS[task].bundled["test"].parent / "LICENSE.note").is_file()
    if task == "truthfulqa_mc1":
        assert max(len(row["choices"]) for row in rows) == 14 and "N" in {row["answer"] for row in rows}


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"choices": ["a", "b", "c", "d", "e"], "answer": "F"}, "'answer' 'F' is not one of the choice letters A-E"),
        ({"choices": ["a", "b", "c"], "answer": "D"}, "'answer' 'D' is not one of the choice letters A-C"),
        ({"choices": list("abcdef"), "answer": "A"}, "'choices' must be a list of 2 to 5 choices"),
        ({"choices": ["a", " "], "answer": "A"}, "'choices' must be non-empty strings"),
    ],
)
def test_bad_multiple_choice_rows_are_named_by_file_and_line(tmp_path, record, message):
    good = {"question": "Q?", "choices": ["a", "b"], "steps": ["[reason]: b."], "answer": "B"}
    path = tmp_path / "csqa.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **record}) + "\n")
    with pytest.raises(UserInputError) as error:
        load_examples(TASKS["commonsenseqa"], str(path), "train")
    assert str(error.value) == f"{path}:2: {message}"


def test_hub_style_choices_are_read():
    record = {"question": "Q?", "choices": {"label": ["A", "B"], "text": ["x", "y"]}, "steps": ["[reason]: y."],
              "answer": "b"}  # fmt: skip
    example = TASKS["commonsenseqa"].to_example(record, "r")
    assert example.question == "Q?\nAnswer Choices:\n(A) x\n(B) y" and example.answer == "B"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["memory_reason_commonsenseqa", "memory_reason_truthfulqa"])
def test_multiple_choice_memory_reason_config_fits_and_tests(tiny_llama, tmp_path, config):
    args = [
        "--config", str(REPO / f"configs/{config}.yaml"), "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--model.init_args.backbone.name", str(tiny_llama), "--data.max_length", "1024",
        "--model.init_args.generation.max_new_tokens", "8", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--data.test_limit", "3",
        "--model.init_args.planning.n_prefix", "2", "--model.init_args.planning.n_special", "4",  # the config's own
    ]  # fmt: skip
    assert run_main(["fit", *args]) == 0
    run = tmp_path / config / "version_0"
    report = json.loads(next((run / "planning").glob("val_step*.json")).read_text())
    assert report["per_question"]["memory"]["gold"] > 0 and report["per_question"]["reason"]["gold"] > 0
    assert run_main(["test", *args, "--ckpt_path", "last"]) == 0
    rows = [json.loads(line) for line in next((run / "samples").glob("test_step*.jsonl")).open()]
    letters = MULTIPLE_CHOICE["commonsenseqa" if "commonsenseqa" in config else "truthfulqa_mc1"][1]
    assert len(rows) == 3 and all(row["answer"] in letters for row in rows)
    assert all(row["correct"] == (row["prediction"] == row["answer"]) for row in rows)
    assert "\nAnswer Choices:\n(A) " in rows[0]["question"]
