"""Questions, steps, answers and targets exactly as the planning-tokens code renders them (`data.protocol:
planning_tokens`; Wang et al. 2024, WANGXinyiLinda/planning_tokens `load_data/preprocess.py`).

Per dataset record: the question (GSM8K / MATH: stripped; AQuA: with its "Answer Choices: (A) ..." line), the
solution steps (split on ". " and newlines, pieces stripped, empty ones dropped; GSM8K appends a missing period,
AQuA drops an "Explanation" opening and a short closing answer line) and the answer written after
"The answer is: " (GSM8K: after "####"; MATH: read from the solution as its scorer reads answers; AQuA: the letter).
The prompt is "Question: " + question + "\\n " (configs: `data.prompt.template`), with the general prefix tokens
appended at evaluation; a planned target is `PlanningSpec.render`, a plain chain of thought `render_cot`.
"""

from __future__ import annotations

from core.errors import UserInputError
from tasks.scoring import INVALID, extract_planning_math

TASKS = ("gsm8k", "math", "aqua")


def _pieces(solution: str) -> list[str]:
    """Split on ". " then on newlines, each piece stripped, empty pieces dropped."""
    return [s.strip() for step in solution.strip().split(". ") for s in step.strip().split("\n") if s.strip()]


def _aqua_steps(rationale: str) -> list[str] | None:
    steps = _pieces(rationale)
    if not steps:
        return None
    if "Explanation" in steps[0]:
        steps[0] = steps[0][12:].strip()  # "Explanation:" is 12 characters
    if len(steps[0]) < 2:
        steps = steps[1:]
    if not steps:
        return None
    if any(word in steps[-1] for word in ("Ans", "ANS", "ans", "Option")):
        steps = steps[:-1] if len(steps[-1]) < 30 else steps
    elif len(steps[-1]) < 5:
        steps = steps[:-1]
    return steps


def _aqua_question(record: dict) -> str:
    choices = ("(" + "(".join(option.strip() for option in record["options"])).replace("(", " (").replace(")", ") ")
    return record["question"].strip() + "\n Answer Choices:" + choices


def upstream_solution(task: str, record: dict) -> tuple[str, list[str], str] | None:
    """(question, steps, answer) of one record as the planning-tokens code builds them; None for a record it skips
    (an AQuA rationale with no step left, a MATH solution its scorer cannot read an answer from)."""
    if task == "gsm8k":
        solution, answer = record["answer"].split("####")[:2]
        steps = [step if step.endswith(".") else step + "." for step in _pieces(solution)]
        return record["question"].strip(), steps, answer.strip()
    if task == "math":
        answer = extract_planning_math(record["solution"])
        return None if answer == INVALID else (record["problem"].strip(), _pieces(record["solution"]), answer)
    if task == "aqua":
        steps = _aqua_steps(record["rationale"])
        return None if steps is None else (_aqua_question(record), steps, record["correct"].strip())
    raise UserInputError(f"data.protocol=planning_tokens supports the tasks {', '.join(TASKS)}, not '{task}'")


def render_cot(steps: list[str], answer: str) -> str:
    """The plain chain-of-thought target (no planning tokens): steps joined by " \\n", then the answer line and
    a trailing space, as the planning-tokens code writes its baseline."""
    return " \n".join(steps) + "\n" + f" The answer is: {answer}\n "
