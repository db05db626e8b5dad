"""Likelihood-dynamics pools with upstream's type names (the dynamics code, 001), from selection, generation and
evaluation outputs: a JSON list of {"instruction", "input", "output", "type"} that `dynamics` and the live
`LikelihoodDynamics` callback read.

- `select --pool_questions N` (see `selection_pool`): `high_llh_train`, `low_llh_train`, `rand_llh_train1..R`;
- `python cli.py pool` (see `pool`): `student_answer_greedy` and `student_answer_non_greedy_<i>` from `predict`
  outputs, and `id_<q>_<base|cp<step>>_<correct|incorrect>` from evaluation outputs of the base model and of
  each checkpoint (q numbers the questions 1, 2, ... in order of first appearance, base first, then by step).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from core.errors import UserInputError
from core.io import write_json_atomic
from core.records import read_json_records
from tasks.examples import seeded_subset

SEED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EVALUATION_LABEL_RE = re.compile(r"base|cp(\d+)")


def pool_entry(record: dict, output: str, type_name: str) -> dict:
    """One pool entry: the record's prompt fields, the response to score and its type."""
    return {"instruction": record.get("instruction", ""), "input": record.get("input", ""), "output": output,
            "type": type_name}  # fmt: skip


def selection_pool(kept: list[dict], questions: int, random_types: int, seed: int) -> list[dict]:
    """Upstream's selection types for `questions` of the selected questions (a seeded subset, all when more):
    `high_llh_train` and `low_llh_train` (the answers train_high / train_low hold), `rand_llh_train1` (the answer
    train_rand holds) and `rand_llh_train2..R` (further seeded draws, without replacement, from the question's
    other finite-likelihood candidates, while there are any).

    `kept`: per selected question {"record", "high", "low", "rand", "options": [finite-likelihood candidates]}."""
    rng = random.Random(seed)
    entries = []
    for question in seeded_subset(kept, questions, seed):
        record = question["record"]
        entries.append(pool_entry(record, question["high"], "high_llh_train"))
        entries.append(pool_entry(record, question["low"], "low_llh_train"))
        others = list(question["options"])
        others.remove(question["rand"])
        draws = [question["rand"], *rng.sample(others, min(len(others), random_types - 1))]
        entries.extend(pool_entry(record, output, f"rand_llh_train{i}") for i, output in enumerate(draws, start=1))
    return entries


def generated_rows(path: str) -> list[tuple[str, dict]]:
    """(place, row) of every row of a `predict` / `test` samples file, checked: a non-empty "question" and
    "completion" or "completions"."""
    rows, places = read_json_records(Path(path))
    for row, place in zip(rows, places, strict=True):
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise UserInputError(f"{place}: field 'question' is missing or empty")
        completions = row.get("completions", [row.get("completion")])
        if not isinstance(completions, list) or not completions or not all(isinstance(c, str) for c in completions):
            raise UserInputError(f"{place}: needs 'completion' (a string) or 'completions' (a list of strings)")
    return list(zip(places, rows, strict=True))


def completions_of(row: dict) -> list[str]:
    return row["completions"] if "completions" in row else [row["completion"]]


def first_sample_correct(place: str, row: dict) -> bool:
    """Whether the first sample (the one the pool scores) was right: `samples_correct[0]`, else `correct`."""
    flags = row.get("samples_correct", [row.get("correct")])
    if not isinstance(flags, list) or not flags or not isinstance(flags[0], bool):
        raise UserInputError(f"{place}: needs 'correct' (true/false) or 'samples_correct' (an evaluation output)")
    return flags[0]


def evaluation_order(evaluations: dict[str, str]) -> list[tuple[str, str]]:
    """(label, file) with `base` first, then checkpoints by step; a label other than base / cp<step> is refused."""
    for label in evaluations:
        if not EVALUATION_LABEL_RE.fullmatch(label):
            raise UserInputError(f"pool: evaluations label '{label}' must be 'base' or 'cp<step>' (e.g. cp555)")
    return sorted(evaluations.items(), key=lambda item: -1 if item[0] == "base" else int(item[0][2:]))


def pool(
    output: str,
    greedy: str | None = None,
    sampled: str | None = None,
    evaluations: dict[str, str] | None = None,
    instruction: str = SEED_INSTRUCTION,
    questions: int | None = None,
    seed: int = 0,
) -> dict:
    """A dynamics pool with upstream's type names from generation and evaluation outputs (a JSON list).

    Args:
        output: the pool file to write (.json).
        greedy: a greedy `predict` output (predictions.jsonl): its (first) completion per question is
            `student_answer_greedy`.
        sampled: a `predict` output with `generation.repeats` n: sample i of each question is
            `student_answer_non_greedy_<i>` (i = 1..n).
        evaluations: label -> samples file (`test` samples/test_step<S>.jsonl or predictions.jsonl) of the base
            model (`base`) and of checkpoints (`cp<step>`): each question's first sample is
            `id_<q>_<label>_<correct|incorrect>`, q numbering the questions from 1 in order of first appearance.
        instruction: the entries' instruction (upstream's by default); the question is the input.
        questions: keep only this many questions (a seeded subset of all questions the files hold).
        seed: seed of that subset.
    """
    sources: list[tuple[str, list[tuple[str, dict]]]] = []
    if greedy:
        sources.append(("greedy", generated_rows(greedy)))
    if sampled:
        sources.append(("sampled", generated_rows(sampled)))
    for label, path in evaluation_order(evaluations or {}):
        sources.append((label, generated_rows(path)))
    if not sources:
        raise UserInputError("pool: give at least one of --greedy, --sampled, --evaluations")
    numbers: dict[str, int] = {}
    for _, rows in sources:
        for _, row in rows:
            numbers.setdefault(row["question"], len(numbers) + 1)
    kept = set(seeded_subset(list(numbers), questions, seed))
    entries = []
    for source, rows in sources:
        for place, row in rows:
            if row["question"] not in kept:
                continue
            record = {"instruction": instruction, "input": row["question"]}
            samples = completions_of(row)
            if source == "greedy":
                entries.append(pool_entry(record, samples[0], "student_answer_greedy"))
            elif source == "sampled":
                names = [f"student_answer_non_greedy_{i}" for i in range(1, len(samples) + 1)]
                entries.extend(pool_entry(record, text, name) for text, name in zip(samples, names, strict=True))
            else:
                verdict = "correct" if first_sample_correct(place, row) else "incorrect"
                entries.append(pool_entry(record, samples[0], f"id_{numbers[row['question']]}_{source}_{verdict}"))
    empty = [entry["type"] for entry in entries if not entry["output"].strip()]
    entries = [entry for entry in entries if entry["output"].strip()]  # an empty response has nothing to score
    if not entries:
        raise UserInputError("pool: every selected response is empty; nothing to score")
    write_json_atomic(Path(output), entries)
    types = list(dict.fromkeys(entry["type"] for entry in entries))
    print(f"Pool of {len(entries)} samples, {len(types)} types ({len(empty)} empty responses left out): {output}")
    return {"output": output, "samples": len(entries), "types": types, "empty_left_out": empty}
