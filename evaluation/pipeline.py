"""The one evaluation path: prompt ids -> generation -> planning tokens removed -> scoring -> typed rows.

Fine-tuning validation, `test`, `predict` and every SLOT arm call `evaluate_batch`; SLOT adds its delta with
a forward hook around the call and continues from its own prefill (`past_key_values`), so SLOT with 0
iterations is exactly `test`. Sampling seeds every sample of every question on its own (evaluation/seeding.py):
one rule for both engines and every caller. The prompts already end with the model's planning prefix (the
datamodule appends `PlanningSpec.eval_prefix()`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError
from evaluation.generation import GenerationSpec, announce_engine, generate
from evaluation.rank_log import RankLogSpec, RankRecorder
from evaluation.rows import EvaluationRow
from evaluation.sampling_metrics import majority_vote, question_metrics
from evaluation.vllm_engine import generate_vllm
from tasks.planning import PlanningSpec
from tasks.scoring import score_completion


def evaluate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: dict,
    generation: GenerationSpec,
    planning: PlanningSpec | None = None,
    rank_log: RankLogSpec | None = None,
    arm: str | None = None,
    past_key_values: Cache | None = None,
) -> list[EvaluationRow]:
    """One row per question of an evaluation batch (left-padded `prompt_ids/prompt_mask`, `id`, `question`,
    `answer`, `answer_format`, optional `position`). `generation.repeats` = n samples per question give the
    majority answer and maj@k / pass@k; `rank_log` records the rank of chosen tokens per sample. A batch with a
    `scorer` (an lm-eval task) is generated with the task's stop strings and length and scored by it."""
    if generation.batch_invariant and len(batch["id"]) > 1:
        if past_key_values is not None:
            raise ValueError("batch_invariant: split the batch (one_question_batches) before its prefill")
        return [
            row
            for single in one_question_batches(batch)
            for row in evaluate_batch(model, tokenizer, single, generation, planning, rank_log, arm)
        ]
    if (scorer := batch.get("scorer")) is not None:
        generation = task_generation(generation, scorer)
    recorder = RankRecorder(rank_log) if rank_log is not None else None
    if generation.engine == "vllm":
        if past_key_values is not None:
            raise UserInputError("generation.engine=vllm cannot continue from a prefill (SLOT): use hf")
        completions = generate_vllm(
            model, tokenizer, batch["prompt_ids"], batch["prompt_mask"], generation, batch["id"], recorder
        )
    else:
        announce_engine("hf", str(model.dtype).removeprefix("torch."))
        completions = generate(
            model,
            tokenizer,
            batch["prompt_ids"],
            batch["prompt_mask"],
            generation,
            past_key_values=past_key_values,
            rank_recorder=recorder,
            question_ids=batch["id"],
        )
    return _rows(batch, completions, generation, planning or PlanningSpec(), recorder, arm)


def one_question_batches(batch: dict) -> list[dict]:
    """Each question of an evaluation batch as a batch of its own, its prompt without the batch's left padding
    (`generation.batch_invariant`); the loss tensors are left out."""
    shared = {key: value for key, value in batch.items() if not isinstance(value, list | torch.Tensor)}
    singles = []
    for index in range(len(batch["id"])):
        keep = batch["prompt_mask"][index].bool()
        single = shared | {key: [value[index]] for key, value in batch.items() if isinstance(value, list)}
        single["prompt_ids"] = batch["prompt_ids"][index, keep][None]
        single["prompt_mask"] = batch["prompt_mask"][index, keep][None]
        singles.append(single)
    return singles


def task_generation(generation: GenerationSpec, scorer) -> GenerationSpec:
    """`generation` with the lm-eval task's stop strings and length (a warning when it had its own)."""
    if generation.stop or generation.max_new_tokens != GenerationSpec.max_new_tokens:
        warnings.warn(
            f"{scorer.name}: the lm-eval task's stop strings and max tokens ({scorer.max_new_tokens}) replace "
            "model.generation's stop and max_new_tokens (set data.lm_eval.max_gen_toks instead)",
            stacklevel=3,
        )
    return replace(generation, stop=list(scorer.stop), max_new_tokens=scorer.max_new_tokens)


def _rows(
    batch: dict, completions: list[str], generation: GenerationSpec, planning: PlanningSpec, recorder, arm
) -> list[EvaluationRow]:
    """Scored rows of a batch's completions (planning tokens removed first), the same for every engine."""
    n, rows, scorer = generation.repeats, [], batch.get("scorer")
    positions = batch.get("position") or [0] * len(batch["id"])
    for index, question_id in enumerate(batch["id"]):
        samples = completions[index * n : (index + 1) * n]
        gold, texts = batch["answer"][index], [planning.remove_tokens(text) for text in samples]
        extra = {}
        if scorer is not None:  # the task's own filters and metric; a sample without an answer votes for its fallback
            predictions, correct, extra["lm_eval"] = scorer.score(question_id, texts)
        else:
            scored = [score_completion(batch["answer_format"], text, gold) for text in texts]
            predictions, correct = [p for p, _ in scored], [c for _, c in scored]
        prediction, is_correct = (predictions[0], correct[0]) if n == 1 else majority_vote(predictions, correct)
        ranks = None
        if recorder is not None:
            ranks = [
                dict(low_confidence_ranks=recorder.low_confidence[i], low_probability_ranks=recorder.low_probability[i])
                for i in range(index * n, (index + 1) * n)
            ]
        rows.append(
            EvaluationRow(
                id=question_id,
                question=batch["question"][index],
                answer=gold,
                completions=samples,
                predictions=predictions,
                samples_correct=correct,
                prediction=prediction,
                correct=is_correct,
                position=int(positions[index]),
                arm=arm,
                metrics=question_metrics(predictions, correct, generation.at_k) if n > 1 else {},
                ranks=ranks,
                extra=extra,
            )
        )
    return rows
