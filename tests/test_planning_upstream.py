"""Planning tokens as the planning-tokens code renders and scores them (WANGXinyiLinda/planning_tokens
`load_data/preprocess.py`, `train.py`, `model/my_trainer.py`): prompts, targets and answers of the paper configs on
bundled GSM8K, MATH-500 and AQuA rows, its strict scorers next to ours, and its arithmetic step types.

Every expected string below was written by hand from upstream's source, not produced by our code."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml
from helpers import REPO, build_tiny_tokenizer

from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from models.vocabulary import add_tokens
from tasks.examples import TASKS, load_examples
from tasks.planning import PlanningSpec, arithmetic_types, split_steps
from tasks.planning_upstream import upstream_solution
from tasks.prompts import PromptSpec
from tasks.scoring import score_completion

P3, A2 = "<prefix_0><prefix_1><prefix_2>", "<answer_0><answer_1>"


def paper_data(config: str, tmp_path=None, rows: list[dict] | None = None, **planning) -> ReasoningDataModule:
    """The datamodule of a paper config's `data` section (its `model.planning` updated by `planning`), with the
    tiny tokenizer and its planning tokens; `rows` become its test file."""
    settings = yaml.safe_load((REPO / "configs" / config).read_text())
    data = {**settings["data"], "prompt": PromptSpec(**settings["data"]["prompt"])}
    if rows is not None:
        data["test_path"] = str(tmp_path / "test.jsonl")
        (tmp_path / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = PlanningSpec(**{**settings["model"]["init_args"]["planning"], **planning})
    tokenizer = build_tiny_tokenizer()
    add_tokens(tokenizer, spec.tokens())
    return ReasoningDataModule(**data, tokenizer=tokenizer, planning=spec)


def rendered(data: ReasoningDataModule, example) -> tuple[str, str, str]:
    """(training prompt, evaluation prompt, target) of one example."""
    solution = data.solution(example)
    prompt = data.formatter.prompt_text(solution[0])
    return prompt, prompt + data.planning.eval_prefix(), data.target(example, solution)


def test_gsm8k_prompt_and_targets_are_upstreams():
    gsm8k = load_examples(TASKS["gsm8k"], None, "train")
    data = paper_data("planning_gsm8k.yaml")  # 3 general tokens, 2 per type, + - * /
    prompt, eval_prompt, target = rendered(data, gsm8k[0])
    question = (
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
        "How many clips did Natalia sell altogether in April and May?"
    )
    assert prompt == f"Question: {question}\n "
    assert eval_prompt == f"Question: {question}\n <prefix_0><prefix_1><prefix_2>"
    assert target == (
        f"{P3}</_0></_1> Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        f"{P3}<+_0><+_1> Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
        f"{P3}{A2} The answer is: 72\n"
    )
    # "Mr. Sanchez" is split on ". " and gets a period; a step without <<...>> is typed from its own text.
    assert rendered(data, gsm8k[35])[2] == (
        f"{P3}<-_0><-_1> Since 40% of his students got below B, 100% - 40% = 60% of Mr.\n"
        f"{P3}<assignment_0><assignment_1> Sanchez's students got B and above.\n"
        f"{P3}<*_0><*_1></_0></_1> Thus, 60 x 60/100 = <<60*60/100=36>>36 students got B and above in their final "
        "grade.\n"
        f"{P3}{A2} The answer is: 36\n"
    )
    cot = paper_data("planning_gsm8k.yaml", method="none")  # configs/planning_modes/lora_cot.yaml
    assert rendered(cot, gsm8k[0]) == (
        f"Question: {question}\n ",
        f"Question: {question}\n ",
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May. \n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n The answer is: 72\n ",
    )
    # Upstream tokenises prompt + target and appends EOS; ours joins their ids, with no space in between.
    tokenizer = data.tokenizer
    input_ids, labels = data.formatter.encode_example(question, target)
    prompt_ids = tokenizer(prompt).input_ids
    assert input_ids == prompt_ids + tokenizer(target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert labels[: len(prompt_ids)] == [-100] * len(prompt_ids)


def test_math_prompt_targets_and_answers_are_upstreams():
    math = load_examples(TASKS["math"], None, "test")
    data = paper_data("planning_math.yaml", n_prefix=1, n_special=1)
    assert rendered(data, math[161]) == (
        "Question: Evaluate $\\log_264$.\n ",
        "Question: Evaluate $\\log_264$.\n <prefix_0>",
        "<prefix_0><^_0><log_0> We have $2^6=64$, so $\\log_2 64 = \\boxed{6}$.\n"
        "<prefix_0><answer_0> The answer is: 6\n",
    )
    # No period added on MATH; every operator of the step's text, in order.
    assert rendered(data, math[98])[2] == (
        "<prefix_0><-_0><+_0><+_0><-_0><+_0><-_0><+_0><-_0><+_0><+_0> "
        "We have $(-k+4) + (-2+3k) = -k + 4 -2 + 3k = \\boxed{2k+2}$.\n<prefix_0><answer_0> The answer is: 2k+2\n"
    )
    # The answer is the last boxed{} normalised as upstream's scorer does (\left, \right and spaces removed).
    assert math[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert data.solution(math[0])[2] == "(3,\\frac{\\pi}{2})"
    cot = paper_data("planning_math.yaml", method="none")
    assert rendered(cot, math[161])[2] == "We have $2^6=64$, so $\\log_2 64 = \\boxed{6}$.\n The answer is: 6\n "


def test_aqua_prompt_and_targets_are_upstreams(tmp_path):
    aqua = load_examples(TASKS["aqua"], None, "test")
    data = paper_data("planning_aqua.yaml", tmp_path, [aqua[13].record, aqua[227].record], n_prefix=1, n_special=1)
    assert rendered(data, aqua[13]) == (
        "Question: Add: +45 and -30\n Answer Choices: (A) -30 (B) +30 (C) 0 (D) 15 (E) -15\n ",
        "Question: Add: +45 and -30\n Answer Choices: (A) -30 (B) +30 (C) 0 (D) 15 (E) -15\n <prefix_0>",
        "<prefix_0><-_0> 45 - 30 = 15\n<prefix_0><answer_0> The answer is: D\n",  # "ANSWER : D" dropped
    )
    assert rendered(data, aqua[227])[2] == (
        "<prefix_0><-_0> (n-1)C2=45\n<prefix_0><-_0> n-1=10\n<prefix_0><assignment_0> n=11\n"
        "<prefix_0><answer_0> The answer is: A\n"  # "The answer is A." dropped
    )
    question, steps, answer = data.solution(aqua[0])
    assert question.endswith(  # every "(" gets a space before it, every ")" one after it
        "reach the base of the tower?\n Answer Choices: (A) 5 (√3 + 1)  (B) 6 (√3 + √2)  (C) 7 (√3 – 1)  "
        "(D) 8 (√3 – 2)  (E) None of these"
    )
    assert steps[0] == "Let the height of the building be h"  # "Explanation :" dropped, no period added
    assert steps[-1] == "So, it takes 5(1 + √3) minutes to reach the base of the tower."  # "Answer : A" dropped
    assert answer == "A"
    # No step left: upstream skips the record when it plans, its plain CoT is the answer line alone.
    no_steps = replace(aqua[13], record={**aqua[13].record, "rationale": "D\nAnswer: D"})
    assert upstream_solution("aqua", no_steps.record)[1] == [] and data.solution(no_steps) is None
    cot = paper_data("planning_aqua.yaml", method="none")
    assert rendered(cot, aqua[13])[2] == "45 - 30 = 15\n The answer is: D\n "
    assert rendered(cot, no_steps)[2] == "\n The answer is: D\n "
    # The test rows: the evaluation prompt ends with the prefix token, the gold is upstream's answer.
    data.setup("test")
    rows = data.splits["test"]
    tokenizer = data.tokenizer
    assert rows["answer"] == ["D", "A"]
    assert rows["prompt_ids"][0] == tokenizer(rendered(data, aqua[13])[1]).input_ids


def test_the_protocol_is_checked():
    with pytest.raises(UserInputError, match="data.protocol must be one of project, planning_tokens, got 'paper'"):
        ReasoningDataModule(protocol="paper")
    with pytest.raises(UserInputError, match="supports the tasks gsm8k, math, aqua, not 'strategyqa'"):
        ReasoningDataModule(task="strategyqa", protocol="planning_tokens")


@pytest.mark.parametrize(
    ("task", "completion", "gold", "strict", "lenient"),
    [
        # GSM8K: the FIRST "The answer is: N", commas removed, then exact string equality.
        ("gsm8k", "<prefix_0> 2 + 2 = 4.\n The answer is: 1,234\n", "1234", ("1234", True), ("1234", True)),
        ("gsm8k", "The answer is: 1000", "1,000", ("1000", True), ("1000", True)),
        ("gsm8k", "The answer is: 18.", "18", ("18.", False), ("18", True)),  # the period is part of N
        ("gsm8k", "The answer is: 18.0", "18", ("18.0", False), ("18", True)),
        ("gsm8k", "The answer is: 5\nThen The answer is: 7", "5", ("5", True), ("7", False)),  # ours: the last
        ("gsm8k", "The answer is 18", "18", ("[invalid]", False), ("18", True)),  # no colon
        ("gsm8k", "The answer is: $18", "18", ("[invalid]", False), ("18", True)),
        ("gsm8k", "I cannot tell.", "18", ("[invalid]", False), (None, False)),
        ("gsm8k", "The answer is: -3\n", "-3", ("-3", True), ("-3", True)),
        # AQuA: the first A-E after the last "The answer is:" upper-cased, else the text's last A-E.
        ("aqua", "<prefix_0> 45 - 30 = 15\n The answer is: B\n", "B", ("B", True), ("B", True)),
        ("aqua", "The answer is: (c)", "C", ("C", True), None),
        ("aqua", "The answer is: none of these", "E", ("E", True), (None, False)),  # the E of NONE
        ("aqua", "The best choice is C, clearly.", "C", ("A", False), ("C", True)),  # the A of CLEARLY
        ("aqua", "The answer is: A. No, the answer is: D", "D", ("A", False), ("D", True)),
        ("aqua", "", "A", ("[invalid]", False), (None, False)),
        # MATH: after "The answer is:", else the last boxed{}, else the last number; MATH-normalised; a numeric
        # gold matches by rounding (integer) or within 4 %, any other by string equality.
        ("math", "The answer is: 6.4\n", "6", ("6.4", True), ("6.4", False)),
        ("math", "The answer is: 2.55", "2.5", ("2.55", True), ("2.55", False)),
        ("math", "The answer is: 1,000", "1000", ("1,000", False), ("1,000", True)),  # read as the tuple (1, 0)
        ("math", "so $x = \\boxed{\\dfrac{3}{4}}$.", "\\frac34", ("\\frac{3}{4}", True), None),
        ("math", "The answer is: .", "5", ("[invalid]", False), None),
        ("math", "I get 12 apples and 5 pears", "5", ("5", True), None),
        ("math", "The answer is 7, I think", "7", ("Theansweris7,Ithink", False), None),
        ("math", "The answer is: x = (3, 4)", "(3,4)", ("(3,4)", True), None),
    ],
)
def test_strict_and_lenient_scorers(task, completion, gold, strict, lenient):
    assert score_completion(f"planning_strict_{task}", completion, gold) == strict
    if lenient is not None:  # the task's own (lenient) scorer on the same completion
        assert score_completion(task, completion, gold) == lenient


GSM8K_STEP_TYPES = {  # train row -> the upstream types of each step, worked out by hand
    0: [["/"], ["+"]],
    2: [["/"], ["*"], ["-", "-", "-"]],
    3: [["*"], ["+"], ["-"], ["/"]],
    8: [["assignment"], ["+"] * 5, ["+", "-"], ["-"]],  # step 3 has no <<...>>: its own text is read
    35: [["-"], ["assignment"], ["*", "/"]],
    48: [["/"], ["+"]],  # "Sam memorized 4+6=10 digits" has no annotation
    5715: [["-", "+", "-", "+", "-"], ["-", "/", "-"], ["-"]],  # both sides of "=": the results' minus signs
    5844: [["assignment"], ["+"], ["+"], ["+", "+", "+", "+", "-"], ["+", "-"], ["-", "-"], ["-"], ["-", "-"]],
}


def test_gsm8k_step_types_follow_upstreams_rule():
    rows = load_examples(TASKS["gsm8k"], None, "train")
    for row, expected in GSM8K_STEP_TYPES.items():
        assert [arithmetic_types(step) for step in split_steps(rows[row].response, "gsm8k")] == expected, row
    # Several annotations in one step: one greedy span from the first "<<" to the last ">>", text between included.
    assert arithmetic_types("He pays 2*3 = <<2*3=6>>6 and 6+4 = <<6+4=10>>10 in all.") == ["*", "+", "+"]
    # MATH / AQuA (no annotations read): the extended keys anywhere, inside words too ("using", "cost").
    assert arithmetic_types("Then using the cost <<3-1=2>>", "extended", annotations=False) == ["sin", "cos", "-"]
    assert arithmetic_types("Let x be the length.", "extended", annotations=False) == ["assignment"]
