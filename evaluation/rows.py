"""Typed evaluation rows, gathered across processes, and every evaluation metric computed from them.

One `EvaluationRow` per (arm, question): its generated samples, their scores and, with repeats, the majority
answer and maj@k / pass@k. Rows are what the sample files hold (`record()`), and the logged metrics, console
tables and summaries are computed from the same gathered rows, so they agree on one process or many.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.distributed as dist

from evaluation.sampling_metrics import mean_metrics
from evaluation.summaries import FORMAT_FLAGS


@dataclass
class EvaluationRow:
    """One question evaluated by one arm (the plain model's arm is None)."""

    id: str
    question: str
    answer: str
    """The gold answer."""
    completions: list[str]
    """Every generated sample, planning tokens included (as generated)."""
    predictions: list[str | None]
    """The answer extracted from each sample (planning tokens removed first)."""
    samples_correct: list[bool]
    prediction: str | None
    """The single sample's answer, or the majority answer over the samples."""
    correct: bool
    position: int = 0
    """The question's place in the evaluation set: rows are written in this order."""
    arm: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """maj@k / pass@k of this question (repeated samples only)."""
    ranks: list[dict] | None = None
    """Rank logs, one entry per sample (written to their own file)."""
    loss_sum: float | None = None
    """Summed next-token loss of the gold response (validation / test), for the loss metric."""
    loss_tokens: int = 0
    extra: dict = field(default_factory=dict)
    """Method-specific fields written with the row (SLOT: prompt, format_ok, slot_loss)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.arm or "", self.id)

    def record(self) -> dict:
        """The row as the JSONL files hold it (one completion, or the samples with their majority vote)."""
        record: dict = {"arm": self.arm} if self.arm is not None else {}
        record.update(id=self.id, question=self.question)
        record.update({key: value for key, value in self.extra.items() if key == "prompt"})
        if len(self.completions) == 1:
            record.update(completion=self.completions[0], prediction=self.prediction)
        else:
            record.update(completions=self.completions, predictions=self.predictions)
            record.update(samples_correct=self.samples_correct, prediction=self.prediction)
        record.update(answer=self.answer, correct=self.correct)
        if self.metrics:
            record["metrics"] = self.metrics
        record.update({key: value for key, value in self.extra.items() if key != "prompt"})
        return record

    def rank_records(self) -> list[dict]:
        """One rank-log line per sample: {"id", "sample", "low_confidence_ranks", "low_probability_ranks"}."""
        return [{"id": self.id, "sample": sample, **ranks} for sample, ranks in enumerate(self.ranks or [])]


def gather_rows(rows: list[EvaluationRow], arm_order: Iterable[str | None] = ()) -> list[EvaluationRow]:
    """Every process's rows (all ranks call this), without the repeats `DistributedSampler` pads ranks with
    (the same (arm, id) twice), ordered by arm (`arm_order`, then first seen) and position in the data."""
    if dist.is_available() and dist.is_initialized():
        every_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, rows)
        rows = [row for rank_rows in every_rank for row in rank_rows]
    unique: dict[tuple[str, str], EvaluationRow] = {}
    for row in rows:
        unique.setdefault(row.key, row)
    order = {arm: index for index, arm in enumerate(arm_order)}
    for row in unique.values():
        order.setdefault(row.arm, len(order))
    return sorted(unique.values(), key=lambda row: (order[row.arm], row.position, row.id))


def rows_by_arm(rows: list[EvaluationRow]) -> dict[str | None, list[EvaluationRow]]:
    by_arm: dict[str | None, list[EvaluationRow]] = {}
    for row in rows:
        by_arm.setdefault(row.arm, []).append(row)
    return by_arm


def summarize(rows: list[EvaluationRow]) -> dict:
    """Questions, accuracy (the majority vote with repeats), loss, and with repeats the samples per question
    and the mean maj@k / pass@k; with SLOT fields, format accuracy and the mean final SLOT loss."""
    summary: dict = {"questions": len(rows), "accuracy": sum(row.correct for row in rows) / len(rows)}
    tokens = sum(row.loss_tokens for row in rows)
    if tokens:
        summary["loss"] = sum(row.loss_sum or 0.0 for row in rows) / tokens
    if len(rows[0].completions) > 1:
        summary["samples_per_question"] = len(rows[0].completions)
        summary.update(mean_metrics([{"metrics": row.metrics} for row in rows]))
    for flag, name in FORMAT_FLAGS.items():
        if flag in rows[0].extra:
            summary[name] = sum(row.extra[flag] for row in rows) / len(rows)
    if "slot_loss" in rows[0].extra:
        summary["mean_final_loss"] = sum(row.extra["slot_loss"][-1] for row in rows) / len(rows)
    summary.update(lm_eval_means([row.extra for row in rows]))
    return summary


def lm_eval_means(records: list[dict]) -> dict[str, float]:
    """{"lm_eval/<filter>/<metric>": mean over the questions} of an lm-eval task's per-question scores (as lm-eval
    reports each filter's metric), from rows or records that carry "lm_eval"; {} otherwise."""
    if not records or "lm_eval" not in records[0]:
        return {}
    names = [(f, metric) for f, metrics in records[0]["lm_eval"].items() for metric in metrics]
    return {
        f"lm_eval/{f}/{metric}": sum(record["lm_eval"][f][metric] for record in records) / len(records)
        for f, metric in names
    }


def logged_metrics(rows: list[EvaluationRow]) -> dict[str, float]:
    """The metrics a stage logs, from its gathered rows: `accuracy`, `loss`, `maj@k`, `pass@k`; with arms,
    `<arm>/accuracy`, `<arm>/format_accuracy`, `<arm>/final_loss`."""
    metrics: dict[str, float] = {}
    for arm, arm_rows in rows_by_arm(rows).items():
        summary = summarize(arm_rows)
        names = {"accuracy": "accuracy", "loss": "loss", **{name: name for name in FORMAT_FLAGS.values()}}
        names.update({"mean_final_loss": "final_loss"})
        names.update({name: name for name in summary if "@" in name or name.startswith("lm_eval/")})
        prefix = f"{arm}/" if arm is not None else ""
        metrics.update({prefix + names[key]: float(value) for key, value in summary.items() if key in names})
    return metrics
