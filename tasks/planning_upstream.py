"""Questions, steps, answers and targets exactly as the planning-tokens code renders them (`data.protocol:
planning_tokens`; Wang et al. 2024, WANGXinyiLinda/planning_tokens `load_data/preprocess.py`).

Per dataset record: the question (GSM8K / MATH: stripped; AQuA: with its "Answer Choices: (A) ..." line), the
solution steps (split on ". " and newlines, pieces stripped, empty ones dropped; GSM8K appends a missing period,
AQuA drops an "Explanation" opening and a short closing answer line) and the answer written after
"The answer is: " (GSM8K: after "####"; MATH: read from the solution as its scorer reads answers; AQuA: the letter).
The prompt is "Question: " + question + "\\n " (configs: `data.prompt.template`), with the general prefix tokens
appended at evaluation; a planned target is `PlanningSpec.render`, a plain chain of thought `render_cot`.

Its scorers (`extract_answer` / `is_correct`) are here too, registered in `tasks/scoring.py` as the
`planning_strict_*` answer formats: the gold answer is read from its rendered answer line with the same extractor
as the prediction.
"""

from __future__ import annotations

import ast
import math
import operator
import re

from core.errors import UserInputError

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


# ------------------------------------------------------------------------------------------- scorers
INVALID = "[invalid]"
_PLANNING_NUMBER_RE = re.compile(r"The answer is: (\-?[0-9\.\,]+)")


def extract_planning_number(text: str) -> str:
    """The FIRST 'The answer is: N' (N of digits, '.', ','; a trailing period kept), commas removed; '[invalid]'."""
    match = _PLANNING_NUMBER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else INVALID


def planning_numbers_equal(predicted: str, gold: str) -> bool:
    """Exact string equality with the gold's own answer line read the same way ('18.' and '18.0' are not '18')."""
    return predicted != INVALID and predicted == extract_planning_number(f"The answer is: {gold}")


def extract_planning_letter(text: str) -> str:
    """The first A-E after the last 'The answer is:' (upper-cased); without the phrase, the last A-E of the
    upper-cased text; '[invalid]' when there is none."""
    pieces = text.split("The answer is:")
    letters = re.findall(r"[A-E]", pieces[-1].strip().upper())
    if not letters:
        return INVALID
    return letters[0] if len(pieces) > 1 else letters[-1]


def planning_letters_equal(predicted: str, gold: str) -> bool:
    """Exact equality with the letter read from the gold's answer line."""
    return predicted != INVALID and predicted == extract_planning_letter(f"The answer is: {gold}")


def _braced_after_boxed(text: str) -> str:
    """After the last 'boxed': the content of its balanced braces (the rest when unbalanced), else up to a '$'."""
    rest = text.split("boxed")[-1]
    if rest[0] != "{":  # IndexError on nothing after 'boxed', as upstream (scored [invalid])
        return rest.split("$")[0].strip()
    depth, content = 1, ""
    for char in rest[1:]:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            break
        content += char
    return content


def _fix_math_fragments(s: str) -> str:
    r"""'\sqrt3' -> '\sqrt{3}', spaces removed, '\frac12' / '\frac1b' -> '\frac{1}{2}', '0.5' and 'a/b' -> \frac."""
    pieces = s.split("\\sqrt")
    s = pieces[0] + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in pieces[1:])
    s = s.replace(" ", "")
    pieces, fixed = s.split("\\frac"), s.split("\\frac")[0]
    for piece in pieces[1:]:
        if piece[0] == "{":
            fixed += "\\frac" + piece
        elif len(piece) < 2:
            return s
        else:
            fixed += "\\frac{" + piece[0] + "}" + (piece[1] if piece[1] == "{" else "{" + piece[1] + "}") + piece[2:]
    s = "\\frac{1}{2}" if fixed == "0.5" else fixed
    if len(parts := s.split("/")) == 2:
        try:
            if s == f"{int(parts[0])}/{int(parts[1])}":
                return f"\\frac{{{int(parts[0])}}}{{{int(parts[1])}}}"
        except ValueError:
            pass
    return s


def strip_math_string(s: str) -> str:
    """The Hendrycks MATH normalisation the planning-tokens code applies (its `_strip_string`); an IndexError on
    a dangling \\sqrt or \\frac, as there."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", "")):
        s = s.replace(old, new)
    for old in ("\\right", "^{\\circ}", "^\\circ", "\\$"):
        s = s.replace(old, "")
    s = s.split("\\text{ ")[0]  # units on the right
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    s = "0" + s if s[0] == "." else s
    if len(parts := s.split("=")) == 2 and len(parts[0]) <= 2:  # "k = 5" -> " 5"
        s = parts[1]
    return _fix_math_fragments(s)


def _upstream_math_answer(text: str) -> str:
    pred = ""
    if "The answer is:" in text:
        pred = text.split("The answer is:")[-1].strip()
    elif "The answer is " in text or "the answer is " in text:
        pred = text.split("the answer is ")[-1].strip()  # upstream splits on the lower-case phrase in both cases
    elif "boxed" in text:
        pred = strip_math_string(_braced_after_boxed(text))
    elif numbers := re.findall(r"-?\d*\.?\d+", text):
        pred = numbers[-1]
    if pred:
        pred = pred[:-1] if pred[-1] == "." else pred
        pred = pred[:-1] if pred[-1] == "/" else pred  # IndexError on a lone ".", as upstream
    pred = strip_math_string(pred)
    return strip_math_string(_braced_after_boxed(pred)) if "boxed" in pred else pred


def extract_planning_math(text: str) -> str:
    """The planning-tokens code's MATH answer: after the last 'The answer is:' (or 'the answer is '), else the
    last boxed{...}, else the last number, MATH-normalised; '[invalid]' where its code raises."""
    try:
        return _upstream_math_answer(text)
    except IndexError:
        return INVALID


def _arithmetic_value(node: ast.AST) -> object:
    """A Python literal arithmetic expression's value (tuples/lists kept); ValueError for anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return node.value
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_arithmetic_value(element) for element in node.elts)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arithmetic_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arithmetic_value(node.left), _arithmetic_value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1000:  # type: ignore[arg-type]
            raise ValueError("exponent too large")
        return _BINARY[type(node.op)](left, right)
    raise ValueError("not arithmetic")


_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow, ast.BitXor: operator.xor,
}  # fmt: skip


def _as_number(value: object) -> float | int | None:
    """float(value); an integral value as an int (upstream's floatify)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return round(number) if number.is_integer() else number


def planning_math_number(text: str) -> float | int | None:
    """The number `text` denotes for the planning-tokens MATH comparison: a float literal, else the value of a
    Python arithmetic expression (its first element when a tuple: '1,000' -> 1); None otherwise. Upstream calls
    eval() here; we evaluate arithmetic only."""
    if (number := _as_number(text)) is not None:
        return number
    try:
        value = _arithmetic_value(ast.parse(text.strip(), mode="eval").body)
        return _as_number(value[0] if isinstance(value, tuple) else value)
    except (SyntaxError, ValueError, TypeError, ArithmeticError, IndexError, RecursionError):
        return None


def planning_math_equal(predicted: str, gold: str) -> bool:
    """Upstream's MATH comparison: a numeric gold matches a number that rounds to it (integer gold) or lies within
    4 % of it; any other gold needs string equality (both MATH-normalised, the gold read from its answer line)."""
    gold = extract_planning_math(f"The answer is: {gold}")
    if predicted == INVALID or gold == INVALID:
        return False
    if (gold_number := planning_math_number(gold)) is None:
        return predicted == gold
    if (number := planning_math_number(predicted)) is None or math.isnan(number):
        return False
    try:
        if isinstance(gold_number, int):
            return round(number) == gold_number
    except OverflowError:
        return False
    return gold_number - abs(gold_number) * 0.04 <= number <= gold_number + abs(gold_number) * 0.04
