"""Planning tokens (Wang et al. 2024) and memory/reason tokens (Jin et al. 2024), in one place.

`PlanningSpec` decides the planning vocabulary from the spec alone (no data needed): keys `prefix`,
`answer`, `assignment` plus the operator keys, cluster labels or `memory`/`reason`; key k owns tokens
`<k_0> ... <k_{m-1}>` (m = n_prefix for `prefix`, n_special otherwise). This module also splits gold
solutions into steps, types the steps (arithmetic operators or memory/reason tags; k-means / VAE
labels come from `tasks.step_types`) and writes the planned target text:

    "<prefix_0>..<prefix_{n-1}><type_0>..<type_{m-1}> step.\n" per step, then
    "<prefix_0>..<answer_0>.. The answer is: ANS\n".

At test time the general prefix tokens are appended to the prompt, so the model generates the types.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from core.errors import UserInputError

METHODS = ("none", "arithmetic", "kmeans", "vae", "vae-next-step", "vae-contrastive", "memory-reason")
CLUSTER_METHODS = ("kmeans", "vae", "vae-next-step", "vae-contrastive")
BASIC_OPERATORS = ("+", "-", "*", "/")
EXTENDED_OPERATORS = (*BASIC_OPERATORS, "^", "!", "sqrt", "frac", "cos", "sin", "tan", "log", "ln", "times")
TAGS = {"rag": "memory", "memory": "memory", "reason": "reason"}
"""Step tags of memory/reason data ("[rag]: ...", "[memory]: ...", "[reason]: ...") -> their key."""
ANSWER_LINE = " The answer is: {answer}"
_TAG_RE = re.compile(r"^\s*\[([A-Za-z_]+)\]\s*:?\s*")


@dataclass
class PlanningSpec:
    """Which planning tokens to add and how solution steps get their types."""

    method: str = "none"
    """Step-type selection: none (plain CoT), arithmetic, kmeans, vae, vae-next-step, vae-contrastive,
    memory-reason (steps tagged "[rag]: / [memory]: / [reason]: ...")."""
    n_prefix: int = 6
    """General prefix tokens before every step (num_general_prefix_tokens)."""
    n_special: int = 0
    """Type tokens per step type (num_special_prefix_tokens); 0 = only the general prefix tokens."""
    operators: str = "basic"
    """arithmetic only: basic (+ - * /, GSM8K) or extended (also ^ ! sqrt frac cos sin tan log ln times)."""
    num_types: int = 5
    """kmeans / vae: the number of step types (clusters)."""
    embedding_model: str | None = None
    """kmeans / vae: the causal LM that embeds steps (a model name as in backbone.name); None = the backbone."""
    vae_epochs: int = 10
    """vae: training epochs of the step VAE (Adam, lr 1e-4)."""
    cache: bool = True
    """kmeans / vae: cache step annotations (keyed by data, method and model) so a second run reuses them."""
    init_spread: float = 0.0
    """Initial rows: every token of a key starts at its word's embedding row; with init_spread > 0 the tokens
    after a key's first add a seeded perturbation of init_spread x each coordinate's std over the vocabulary,
    so they start distinct (0 = identical copies of the word's row, the paper's). On SmolLM2 (tied) 1.0 makes
    the untrained model put 65 % of the next-token mass on the prefix tokens after the evaluation prefix
    (0.1: 2.5 %, 0: 1 %)."""
    token_lr: float | None = None
    """Learning rate of the new token rows in the prompt-tuning modes (None = the optimizer's)."""
    untie_output: bool = False
    """On a model whose lm_head is its input embedding (tied, e.g. SmolLM2), train the planning tokens' output
    rows apart from their input rows: the lm_head becomes a copy of the embedding matrix (+ vocabulary x hidden
    weights in memory and in full exports). No effect on an untied model."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            known = ", ".join(METHODS)
            raise UserInputError(f"model.planning.method: unknown selection method '{self.method}'; known: {known}")
        if self.operators not in ("basic", "extended"):
            raise UserInputError(f"model.planning.operators must be basic or extended, got '{self.operators}'")
        if self.init_spread < 0 or (self.token_lr is not None and self.token_lr <= 0):
            raise UserInputError("model.planning.init_spread must be >= 0 and token_lr > 0")
        if self.n_prefix < 0 or self.n_special < 0:
            raise UserInputError("model.planning.n_prefix and n_special must be >= 0")
        if self.active and self.n_prefix == 0 and self.n_special == 0:
            raise UserInputError(
                f"model.planning.method={self.method} with n_prefix = n_special = 0 adds no tokens: "
                "set planning.n_prefix or planning.n_special (or method: none)"
            )
        if self.method in CLUSTER_METHODS and self.num_types < 2:
            raise UserInputError(f"model.planning.num_types must be >= 2 for {self.method}, got {self.num_types}")

    @property
    def active(self) -> bool:
        return self.method != "none"

    def type_keys(self) -> list[str]:
        """The step-type keys (beside prefix / answer) this spec can assign."""
        if self.method == "arithmetic":
            return ["assignment", *(BASIC_OPERATORS if self.operators == "basic" else EXTENDED_OPERATORS)]
        if self.method in CLUSTER_METHODS:
            return [str(label) for label in range(self.num_types)]
        if self.method == "memory-reason":
            return ["assignment", "memory", "reason"]
        return []

    def key_tokens(self) -> dict[str, list[str]]:
        """Ordered key -> token strings; empty for method none."""
        if not self.active:
            return {}
        keys = {"prefix": self.n_prefix, "answer": self.n_special}
        keys.update({key: self.n_special for key in self.type_keys()})
        return {key: [f"<{key}_{i}>" for i in range(count)] for key, count in keys.items() if count}

    def tokens(self) -> list[str]:
        """Every added token, in the order they get their ids."""
        return [token for tokens in self.key_tokens().values() for token in tokens]

    def init_word(self, key: str) -> str | None:
        """The word whose embedding initialises the rows of `key` (None: the mean embedding)."""
        return None if self.method in CLUSTER_METHODS and key not in ("prefix", "answer") else key

    def eval_prefix(self) -> str:
        """What evaluation appends to the prompt: the general prefix tokens."""
        return "".join(self.key_tokens().get("prefix", []))

    def plan(self, types: list[str]) -> str:
        """Planning tokens before one step of `types` (several types -> their tokens in order)."""
        tokens = self.key_tokens()
        return "".join(tokens.get("prefix", []) + [t for key in types for t in tokens.get(key, [])])

    def render(self, steps: list[str], types: list[list[str]], answer: str) -> str:
        """The planned target: every step behind its planning tokens, then the answer line."""
        lines = [f"{self.plan(step_types)} {step}\n" for step, step_types in zip(steps, types, strict=True)]
        return "".join(lines) + self.plan(["answer"]) + ANSWER_LINE.format(answer=answer) + "\n"

    def count_types(self, text: str) -> Counter:
        """How many steps of each key `text` plans (occurrences of each key's first token)."""
        tokens = self.key_tokens()
        return Counter({key: text.count(toks[0]) for key, toks in tokens.items()})

    def follows_layout(self, text: str) -> bool:
        """Whether `text` (a planned solution, the evaluation prefix included) has the trained layout: one or more
        steps, each its planning tokens then text without planning tokens, then the answer line. Checked line by
        line (linear time: a whole-text pattern backtracked for minutes on long degenerate generations)."""
        tokens = self.key_tokens()
        if not tokens:
            return False
        prefix = re.escape("".join(tokens.get("prefix", [])))
        types = "|".join(re.escape("".join(t)) for key, t in tokens.items() if key not in ("prefix", "answer"))
        step = re.compile(prefix + (f"(?:{types})+" if types else "") + "(?P<text>.*)")
        answer = re.compile(
            prefix + re.escape("".join(tokens.get("answer", [])) + ANSWER_LINE.format(answer="")) + "(?P<text>.*)"
        )
        lines = text.rstrip().split("\n")

        def plain(match: re.Match | None) -> bool:
            rest = match.group("text") if match else ""
            return bool(rest.strip()) and not any(token in rest for token in self.tokens())

        return (
            len(lines) > 1
            and all(plain(step.fullmatch(line)) for line in lines[:-1])
            and plain(answer.fullmatch(lines[-1]))
        )

    def remove_tokens(self, text: str) -> str:
        """`text` without planning tokens (what answer extraction reads)."""
        for token in self.tokens():
            text = text.replace(token, "")
        return text


def split_steps(solution: str, task: str) -> list[str]:
    """Solution -> steps: split on ". " and newlines, empty pieces dropped, a period appended where missing.
    GSM8K drops the "#### N" line; AQuA drops an "Explanation" prefix and a short trailing "Answer: X" line."""
    if task == "gsm8k":
        solution = solution.split("####")[0]
    if task == "aqua":
        solution = re.sub(r"^\s*explanation\s*:?\s*", "", solution, flags=re.IGNORECASE)
        lines = solution.strip().splitlines()
        while lines and len(lines[-1]) < 40 and re.match(r"\s*(the\s+)?answer\b", lines[-1], re.IGNORECASE):
            lines = lines[:-1]  # the rationale's own "Answer: B" and the task's appended "The answer is B."
        solution = "\n".join(lines)
    steps = []
    for line in solution.splitlines():
        for piece in line.split(". "):
            piece = piece.strip()
            if piece:
                steps.append(piece if piece.endswith(".") else piece + ".")
    return steps


_OPERATOR_RE = {
    name: re.compile("|".join(re.escape(key) for key in keys))
    for name, keys in (("basic", BASIC_OPERATORS), ("extended", EXTENDED_OPERATORS))
}
"""The operator keys as one alternation, no word boundaries (as the planning-tokens code: "using" holds "sin")."""
_ANNOTATION_SPAN_RE = re.compile(r"<<.*>>")
"""Greedy: one span from a step's first "<<" to its last ">>" (both sides of "=", and the text between)."""


def arithmetic_types(step: str, operators: str = "basic", annotations: bool = True) -> list[str]:
    """The planning-tokens code's arithmetic step types: every operator key found, in order, repeats kept, in the
    step's `<<...>>` span when `annotations` (GSM8K) and the step has one, else in the whole step text;
    ["assignment"] when there is none."""
    spans = _ANNOTATION_SPAN_RE.findall(step) if annotations else []
    found = [key for text in (spans or [step]) for key in _OPERATOR_RE[operators].findall(text)]
    return found or ["assignment"]


def tagged_steps(response: str, where: str) -> tuple[list[str], list[list[str]]]:
    """Memory/reason data: one "[rag]: ..." / "[memory]: ..." / "[reason]: ..." step a line -> (steps
    without their tags, [[key]] per step). An untagged step or an unknown tag is an error naming `where`."""
    steps, types = [], []
    for number, line in enumerate((line for line in response.splitlines() if line.strip()), start=1):
        match = _TAG_RE.match(line)
        if not match:
            raise UserInputError(f"{where}: step {number} has no [rag]/[memory]/[reason] tag: {line.strip()[:60]!r}")
        tag = match.group(1).lower()
        if tag not in TAGS:
            raise UserInputError(
                f"{where}: step {number} has unknown type key '[{match.group(1)}]'; known: {', '.join(TAGS)}"
            )
        steps.append(line[match.end() :].strip())
        types.append([TAGS[tag]])
    if not steps:
        raise UserInputError(f"{where}: the solution has no steps")
    return steps, types
