"""`python cli.py select`: likelihood-based data selection (upstream code 001).

Scores every candidate answer of every question under a model and keeps, per question, the answer with
the highest log-likelihood, the lowest, and a seeded random one, as three training sets in the instruction
format {"instruction", "input", "output"} (`train_high.jsonl`, `train_low.jsonl`, `train_rand.jsonl`),
plus `scores.jsonl` (every candidate's metrics) and `selection.json` (settings and counts); with
`pool_questions`, also `pool.json`, a dynamics pool with upstream's types (`commands/pool.py`).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import torch

from commands.pool import SEED_INSTRUCTION, selection_pool
from core.errors import UserInputError
from core.io import check_output_folder, write_json_atomic, write_jsonl_atomic
from core.records import read_json_records
from evaluation.likelihood import ScoringSpec, score_texts
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.examples import TASKS


def read_candidates(path: str, instruction: str) -> list[dict]:
    """Questions with their candidates: [{"record": training-record fields but "output", "candidates": [...]}].

    Rows: `predict` output ({"question", "completions": [...]} or {"question", "completion"}; "id" and
    "answer" are kept), or instruction-format rows {"instruction", "input", "output"}. Rows of the same
    question are grouped, in order of first appearance."""
    records, places = read_json_records(Path(path))
    groups: dict[tuple, dict] = {}
    for row, place in zip(records, places, strict=True):
        if "question" in row:
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise UserInputError(f"{place}: field 'question' is empty")
            if isinstance(row.get("completions"), list):
                candidates = row["completions"]
            elif "completion" in row:
                candidates = [row["completion"]]
            else:
                raise UserInputError(f"{place}: needs 'completions' (a list) or 'completion' beside 'question'")
            base = {"instruction": instruction, "input": row["question"]}
            for name in ("id", "answer"):
                if name in row:
                    base[name] = row[name]
        elif "output" in row:
            if not (row.get("instruction") or row.get("input")):
                raise UserInputError(f"{place}: needs a non-empty 'instruction' or 'input' beside 'output'")
            candidates = [row["output"]]
            base = {key: row[key] for key in ("instruction", "input", "id", "answer") if key in row}
        else:
            raise UserInputError(f"{place}: expected 'question' + 'completions' or 'instruction'/'input' + 'output'")
        if not all(isinstance(candidate, str) for candidate in candidates):
            raise UserInputError(f"{place}: every candidate answer must be a string")
        key = (base.get("instruction", ""), base.get("input", ""))
        group = groups.setdefault(key, {"record": base, "candidates": []})
        group["candidates"].extend(candidates)
    return list(groups.values())


def select(
    candidates: str,
    model: ModelSpec | None = None,
    checkpoint: str | None = None,
    output_dir: str = "runs/selection",
    instruction: str = SEED_INSTRUCTION,
    scoring: ScoringSpec | None = None,
    seed: int = 0,
    device: str = "auto",
    pool_questions: int = 0,
    pool_random: int = 5,
) -> dict:
    """Write the highest-, lowest- and random-likelihood answer per question as three training sets.

    Empty candidates are left out; a candidate with a non-finite log-likelihood never counts; a question
    left with no candidate is skipped (counted in selection.json).

    Args:
        candidates: a .jsonl/.json file: `predict` output rows ("question" with "completions" or "completion")
            or instruction-format rows ("instruction", "input", "output"); rows of one question are grouped.
        model: the scoring model (default: the embedded smollm2-135m-instruct).
        checkpoint: score with a fine-tuned checkpoint of `model` (an epoch_N export or a Lightning .ckpt).
        output_dir: where train_high/low/rand.jsonl, scores.jsonl and selection.json go.
        instruction: the instruction of `predict` rows' training records (upstream's by default).
        scoring: prompt format (recorded in selection.json), batch size, head chunk size.
        seed: seed of the random choice.
        device: cpu, cuda, or auto (cuda when available).
        pool_questions: also write pool.json, a likelihood-dynamics pool of this many selected questions (a seeded
            subset; 0 = none) with upstream's types: high_llh_train, low_llh_train (the answers train_high /
            train_low hold), rand_llh_train1 (train_rand's) and rand_llh_train2..`pool_random` (further seeded
            draws from the question's other finite-likelihood candidates, while there are any).
        pool_random: how many rand_llh_train<i> types (at least 1).
    """
    model, scoring = model or ModelSpec(), scoring or ScoringSpec()
    if pool_questions < 0 or pool_random < 1:
        raise UserInputError(
            f"select: pool_questions must be >= 0 and pool_random >= 1, got {pool_questions}, {pool_random}"
        )
    check_output_folder(output_dir, "select --output_dir")
    groups = read_candidates(candidates, instruction)
    pairs, owners, empty = [], [], 0
    for index, group in enumerate(groups):
        question = TASKS["instruction"].to_example({**group["record"], "output": ""}, "").question
        for candidate in group["candidates"]:
            if candidate.strip():
                pairs.append((question, candidate))
                owners.append(index)
            else:
                empty += 1
    if not pairs:
        raise UserInputError(f"{candidates}: no non-empty candidate answer to score")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = load_trained(model, checkpoint)
    scorer = trained.model.requires_grad_(False).to(device)
    metrics = score_texts(scorer, trained.tokenizer, pairs, scoring, progress="scoring candidates")

    scored: list[list[tuple[float, str]]] = [[] for _ in groups]
    score_rows = []
    for (_, candidate), owner, result in zip(pairs, owners, metrics, strict=True):
        score_rows.append({"question_index": owner, "output": candidate, **asdict(result)})
        if math.isfinite(result.log_likelihood):
            scored[owner].append((result.log_likelihood, candidate))
    rng = random.Random(seed)
    sets: dict[str, list[dict]] = {"high": [], "low": [], "rand": []}
    kept = []
    for group, options in zip(groups, scored, strict=True):
        if not options:
            continue
        ranked = sorted(options, key=lambda option: option[0])  # stable: ties keep the candidates' order
        chosen = {"high": ranked[-1][1], "low": ranked[0][1], "rand": rng.choice(options)[1]}
        for name, output in chosen.items():
            sets[name].append({**group["record"], "output": output})
        kept.append({"record": group["record"], **chosen, "options": [output for _, output in options]})
    out = Path(output_dir)
    for name, rows in sets.items():
        write_jsonl_atomic(out / f"train_{name}.jsonl", rows)
    write_jsonl_atomic(out / "scores.jsonl", score_rows)
    if pool_questions:
        write_json_atomic(out / "pool.json", selection_pool(kept, pool_questions, pool_random, seed))
    summary = {
        "candidates_file": str(candidates),
        "model": asdict(model),
        "checkpoint": checkpoint,
        "settings": {"prompt": asdict(scoring.prompt), "score": scoring.score, "seed": seed},
        "pool": {"questions": pool_questions, "random_types": pool_random} if pool_questions else None,
        "questions": len(groups),
        "selected_questions": len(sets["high"]),
        "skipped_questions": len(groups) - len(sets["high"]),
        "candidates_scored": len(pairs),
        "empty_candidates": empty,
    }
    write_json_atomic(out / "selection.json", summary)
    print(f"Selected {len(sets['high'])} of {len(groups)} questions: {out}/train_{{high,low,rand}}.jsonl")
    return summary
