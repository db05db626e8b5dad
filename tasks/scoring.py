"""Answer extraction and equivalence for the reasoning benchmarks: the one place the project does it.

Each benchmark has an :class:`AnswerFormat`: ``extract`` pulls the final answer out of a model completion
(or a gold solution) and ``equivalent(predicted, gold)`` decides whether two extracted answers match.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from tasks.planning_upstream import (
    extract_planning_letter,
    extract_planning_math,
    extract_planning_number,
    planning_letters_equal,
    planning_math_equal,
    planning_numbers_equal,
)

# math_verify bounds sympy with signal.alarm, which only works in the main thread. Elsewhere (threads) we pass
# None and instead refuse inputs that are known to hang sympy: power towers and huge exponents.
MATH_VERIFY_TIMEOUT_S = 5
_HANGS_SYMPY_RE = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\{?\s*\d{5,}")

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_LOOSE_NUMBER_RE = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # lm-eval "flexible-extract"
_DECIMAL_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION_RE = re.compile(r"(-?\d+)/(\d+)")
_ANSWER_IS = r"the\s+(?:final\s+)?answer\s+is\s*:?"
UNICODE_MINUS = "\u2212"


@dataclass(frozen=True)
class AnswerFormat:
    """How one benchmark's answers are extracted and compared."""

    name: str
    extract: Callable[[str], str | None]
    equivalent: Callable[[str, str], bool]


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` / ``\fbox{...}`` (nested braces handled; also ``\boxed 5``)."""
    if not (matches := list(_BOXED_RE.finditer(text))):
        return None
    stripped = text[matches[-1].end() :].lstrip()
    if not stripped.startswith("{"):  # "\boxed 5"
        token = re.match(r"[^\s$]+", stripped)
        return token.group(0) if token else None
    depth = 0
    for i, char in enumerate(stripped):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return stripped[1:i].strip()
    return None  # unbalanced, e.g. a completion cut off inside the box


def ascii_minus(text: str) -> str:
    """The Unicode minus sign (U+2212, "−5") as "-". Dashes (en dash "5–10") are ranges and stay as they are."""
    return text.replace(UNICODE_MINUS, "-")


def normalize_number(text: str) -> str | None:
    """Canonical plain number ("1,000.00" -> "1000", "$-3.50" -> "-3.5", "−4" -> "-4", "72." -> "72"); None if
    not one."""
    s = ascii_minus(text).strip().replace(",", "").replace("$", "").rstrip(".").lstrip("+")
    if fraction := _FRACTION_RE.fullmatch(s):
        return f"{int(fraction.group(1))}/{int(fraction.group(2))}"
    if not _DECIMAL_RE.fullmatch(s):
        return None
    try:
        value = Decimal(s).normalize()
    except InvalidOperation:
        return None
    return format(value, "f") if value != 0 else "0"


def last_number(text: str) -> str | None:
    """The last number in ``text`` (lm-eval flexible-extract), normalised; None when there is none."""
    for match in reversed(list(_LOOSE_NUMBER_RE.finditer(ascii_minus(text)))):
        if (number := normalize_number(match.group(0))) is not None:
            return number
    return None


def numbers_equivalent(predicted: str, gold: str) -> bool:
    """Numeric equality within 1e-6 (fractions like "3/4" allowed), else exact string equality."""
    pred_number, gold_number = normalize_number(predicted), normalize_number(gold)
    try:
        return abs(Fraction(pred_number) - Fraction(gold_number)) <= Fraction(1, 10**6)  # type: ignore[arg-type]
    except (TypeError, ValueError, ZeroDivisionError):  # not both numbers
        return (pred_number or predicted.strip()) == (gold_number or gold.strip())


# ---------------------------------------------------------------------------------------------- gsm8k
_STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval "strict-match"
_ANSWER_IS_NUMBER_RE = re.compile(_ANSWER_IS + r"[\s*$]*(-?\$?\s*[0-9][0-9,]*(?:\.[0-9]+)?)", re.IGNORECASE)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)


def extract_gsm8k(text: str) -> str | None:
    """'#### N', then the last 'The answer is N', then <answer> tags, then \\boxed{}, then the last number."""
    text = ascii_minus(text)
    strict = _STRICT_RE.search(text)
    answer_is = _ANSWER_IS_NUMBER_RE.findall(text)
    tags = _ANSWER_TAG_RE.findall(text)
    boxed = extract_boxed(text)
    candidates = [
        strict.group(1) if strict else None,
        answer_is[-1] if answer_is else None,
        last_number(tags[-1]) if tags else None,
        last_number(boxed) if boxed else None,
        last_number(text),
    ]
    for candidate in candidates:
        if candidate is not None and (number := normalize_number(candidate)) is not None:
            return number
    return None


# ----------------------------------------------------------------------------------------------- math
_ANSWER_IS_LINE_RE = re.compile(_ANSWER_IS + r"\s*(.+)", re.IGNORECASE)
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf|textnormal)\s*\{([^{}]*)\}")
_UNITS_RE = re.compile(  # trailing units: "10\text{ cm}^2", "5\mbox{ inches}", "3\text{km}"
    r"(?<=[\d}])\s*\\(?:text|mbox|mathrm)\s*\{(?:\s+[A-Za-z]|[A-Za-z]{2})[A-Za-z\s.]*\}(?:\^[23]|\^\{[23]\})?$"
)
_SPACING = (r"\ ", r"\!", r"\,", r"\;", r"\:", "~", r"\displaystyle")
_REMOVED = (*_SPACING, r"\left", r"\right", r"^{\circ}", r"^\circ", "°", r"\$", "$", r"\%", "%")


def normalize_math_answer(text: str) -> str:
    r"""Hendrycks-style canonical LaTeX answer: "\left( 3, \dfrac12 \right)" -> "(3,\frac{1}{2})"."""
    s = ascii_minus(text).strip().replace("\n", "").replace("tfrac", "frac").replace("dfrac", "frac")
    s = re.sub(r"\\(?:big|Big|bigg|Bigg)[lr]?(?![a-z])", "", s)
    for token in _REMOVED:
        s = s.replace(token, "")
    s = _UNITS_RE.sub("", s.strip())
    s = _TEXT_WRAPPER_RE.sub(r"\1", s).replace("{,}", ",").strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"(^|[^\d}])\.(\d)", r"\g<1>0.\2", s)  # ".5" -> "0.5"
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5" -> "5"
        s = parts[1]
    s = re.sub(r"\\sqrt\s*([^\s{\[\\])", r"\\sqrt{\1}", s)
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)
    s = re.sub(r"^\(([A-Z])\)$", r"\1", s)  # "(C)" -> "C"
    if (number := normalize_number(s)) is not None:
        s = number
    return s


def math_verify_equivalent(predicted: str, gold: str) -> bool:
    """Symbolic equality via math_verify (both sides wrapped in \\boxed{}); False on error or timeout."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    if timeout is None and (_HANGS_SYMPY_RE.search(predicted) or _HANGS_SYMPY_RE.search(gold)):
        return False
    try:
        gold_parsed = parse(f"$\\boxed{{{gold}}}$", parsing_timeout=timeout)
        pred_parsed = parse(f"$\\boxed{{{predicted}}}$", parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 - sympy can raise anything (or time out) on odd input
        return False


def extract_math(text: str) -> str | None:
    """Last \\boxed{} content, then the last 'The answer is ...', then the last number."""
    text = ascii_minus(text)
    if boxed := extract_boxed(text):
        return boxed
    if answers := list(_ANSWER_IS_LINE_RE.finditer(text)):
        answer = answers[-1].group(1).strip().strip("*")
        if dollars := re.match(r"\$+([^$]+)\$+", answer):
            answer = dollars.group(1)
        else:
            answer = re.split(r"\.\s", answer)[0]
        if answer := answer.strip().rstrip(".").strip():
            return answer
    return last_number(text)


def math_equivalent(predicted: str, gold: str) -> bool:
    """Hendrycks-normalised string equality, else symbolic equality via math_verify."""
    if normalize_math_answer(predicted) == normalize_math_answer(gold):
        return True
    return math_verify_equivalent(predicted, gold)


# ------------------------------------------------------------------------------- option letters (aqua)
def _letter_patterns(letters: str) -> tuple[list[re.Pattern], list[re.Pattern]]:
    """The phrase and fallback patterns of option letters in the range `letters` ("A-E", "A-N")."""
    letter = rf"\(?([{letters}])\)?(?![A-Za-z0-9])"
    phrases = [
        re.compile(
            r"\b(?i:answer|ans)(?:\s*(?i:is|will\s+be|would\s+be|:|=|-|,))*\s*(?i:options?|choice)?\s*[:.]?\s*" + letter
        ),
        re.compile(r"\b(?i:option|choice)\s*(?i:is)?\s*[:=]?\s*" + letter),
        re.compile(
            r"(?<![A-Za-z])" + letter + r"\s+(?i:is\s+(?:the\s+)?(?:correct|right)?\s*(?:answer|option|choice))"
        ),
    ]
    fallbacks = [
        re.compile(rf"(?:^|\s)\(?([{letters}])\)?\.?\s*$"),  # the text ends with a lone letter: "...\nThus A"
        re.compile(rf"\(([{letters}])\)"),
        re.compile(rf"(?:^|\s)([{letters}])\)"),
    ]
    return phrases, fallbacks


_LETTER_RES = {letters: _letter_patterns(letters) for letters in ("A-E", "A-N")}


def extract_letter(text: str, letters: str = "A-E") -> str | None:
    """Option letter in `letters` ("A-E" or "A-N"): the last 'answer is (C)'-like phrase, else \\boxed{}, else a
    final/last '(C)'."""
    phrase_res, fallback_res = _LETTER_RES[letters]
    phrases = [match for pattern in phrase_res for match in pattern.finditer(text)]
    if phrases:
        return max(phrases, key=lambda match: match.end()).group(1).upper()
    if (boxed := extract_boxed(text)) is not None and (letter := re.search(f"[{letters}]", boxed)):
        return letter.group(0)
    for pattern in fallback_res:
        if found := pattern.findall(text):
            return found[-1]
    return None


def extract_aqua(text: str) -> str | None:
    """Option letter A-E (AQuA, CommonsenseQA): see `extract_letter`."""
    return extract_letter(text, "A-E")


def extract_letter_a_n(text: str) -> str | None:
    """Option letter A-N (TruthfulQA MC1, up to 14 choices): see `extract_letter`."""
    return extract_letter(text, "A-N")


def letters_equivalent(predicted: str, gold: str) -> bool:
    """Case-insensitive option-letter equality (any letter range: A-E, A-N)."""
    return predicted.strip().strip("()").upper() == gold.strip().strip("()").upper()


# -------------------------------------------------------------------------------------------- boolean
_BOOLEAN_RE = re.compile(r"\b(true|false|yes|no)\b", re.IGNORECASE)
_BOOLEAN_VALUES = {"true": "True", "yes": "True", "false": "False", "no": "False"}


def extract_boolean(text: str) -> str | None:
    """Last true/false/yes/no (after the last 'The answer is' when present) as "True" / "False"."""
    answers = list(re.finditer(_ANSWER_IS, text, re.IGNORECASE))
    if answers and (found := _BOOLEAN_RE.findall(text[answers[-1].end() :])):
        return _BOOLEAN_VALUES[found[0].lower()]
    found = _BOOLEAN_RE.findall(text)
    return _BOOLEAN_VALUES[found[-1].lower()] if found else None


def booleans_equivalent(predicted: str, gold: str) -> bool:
    """Equality after mapping yes/no/true/false (any case) to "True"/"False"."""
    predicted_value = extract_boolean(predicted)
    return predicted_value is not None and predicted_value == extract_boolean(gold)


# ---------------------------------------------------------------------------------------- last_number
_SLOT_NUMBER_RE = re.compile(r"\d+\.\d+|\d+/\d+|\d+")


def extract_last_number_plain(text: str) -> str | None:
    r"""The SLOT reference's prediction: the last match of `\d+\.\d+|\d+/\d+|\d+` (no sign, no commas)."""
    matches = _SLOT_NUMBER_RE.findall(text)
    return matches[-1] if matches else None


def math_verify_expressions(predicted: str, gold: str) -> bool:
    """The SLOT reference's comparison: both sides parsed as plain expressions (math_verify's
    `ExprExtractionConfig`), then `verify(prediction, gold)`; False when either does not parse or on timeout."""
    from math_verify import ExprExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    if timeout is None and (_HANGS_SYMPY_RE.search(predicted) or _HANGS_SYMPY_RE.search(gold)):
        return False
    config = [ExprExtractionConfig()]
    try:
        pred_parsed = parse(predicted, extraction_config=config, parsing_timeout=timeout)
        gold_parsed = parse(gold, extraction_config=config, parsing_timeout=timeout)
        return bool(pred_parsed and gold_parsed and verify(pred_parsed, gold_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001 - sympy can raise anything (or time out) on odd input
        return False


# -------------------------------------------------------------------------------------------- registry
ANSWER_FORMATS: dict[str, AnswerFormat] = {
    "gsm8k": AnswerFormat("gsm8k", extract_gsm8k, numbers_equivalent),
    "math": AnswerFormat("math", extract_math, math_equivalent),
    "aqua": AnswerFormat("aqua", extract_aqua, letters_equivalent),
    "letters_a_e": AnswerFormat("letters_a_e", extract_aqua, letters_equivalent),
    "letters_a_n": AnswerFormat("letters_a_n", extract_letter_a_n, letters_equivalent),
    "boolean": AnswerFormat("boolean", extract_boolean, booleans_equivalent),
    "last_number": AnswerFormat("last_number", extract_last_number_plain, math_verify_expressions),
    "planning_strict_gsm8k": AnswerFormat("planning_strict_gsm8k", extract_planning_number, planning_numbers_equal),
    "planning_strict_math": AnswerFormat("planning_strict_math", extract_planning_math, planning_math_equal),
    "planning_strict_aqua": AnswerFormat("planning_strict_aqua", extract_planning_letter, planning_letters_equal),
}


def get_answer_format(name: str) -> AnswerFormat:
    """The registered :class:`AnswerFormat` called ``name``; ValueError listing the known names otherwise."""
    if name not in ANSWER_FORMATS:
        raise ValueError(f"Unknown answer format {name!r}; known formats: {', '.join(ANSWER_FORMATS)}")
    return ANSWER_FORMATS[name]


def score_completion(answer_format: str | AnswerFormat, completion: str, gold: str) -> tuple[str | None, bool]:
    """(extracted prediction, correct); correct is False when nothing could be extracted."""
    fmt = get_answer_format(answer_format) if isinstance(answer_format, str) else answer_format
    predicted = fmt.extract(completion)
    if predicted is None:
        return None, False
    return predicted, bool(fmt.equivalent(predicted, str(gold)))
