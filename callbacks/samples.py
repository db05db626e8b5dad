"""Sample writer: what the model generated, as a TensorBoard table (validation) and JSONL files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from core.io import run_directory, write_json_atomic, write_jsonl_atomic
from evaluation.rows import EvaluationRow, rows_by_arm, summarize


class SampleWriter(L.Callback):
    """Writes the rows of every evaluation epoch: the module's gathered `evaluation_rows` (typed rows, the same
    on every process, from which the module also logged its metrics).

    - validation: `samples/val_step{step}.jsonl` and a table of `table_rows` rows in TensorBoard;
    - test: `samples/test_step{step}.jsonl` plus `samples/test_step{step}_summary.json`; rows of several arms
      (SLOT) go to `samples/test_step{step}/{arm}.jsonl` plus `summary.json`;
    - predict: `predictions.jsonl`.
    Rank logs (one entry per sample) go to `<name>_ranks.jsonl` beside the samples (`rank_logs.jsonl` for
    predict): one line per sequence {"id", "sample", "low_confidence_ranks", "low_probability_ranks"}, in the
    samples' order. Everything under the run's log directory, written atomically by rank 0.
    """

    def __init__(self, table_rows: int = 4) -> None:
        self.table_rows = table_rows

    def on_validation_end(self, trainer, module) -> None:
        rows, run_dir = getattr(module, "evaluation_rows", []), run_directory(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not rows:
            return
        name = f"val_step{trainer.global_step}"
        write_rows(run_dir / "samples" / f"{name}.jsonl", run_dir / "samples" / f"{name}_ranks.jsonl", rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = markdown_table([row.record() for row in rows[: self.table_rows]])
                logger.experiment.add_text("val/samples", text, trainer.global_step)

    def on_test_end(self, trainer, module) -> None:
        rows, run_dir = getattr(module, "evaluation_rows", []), run_directory(trainer)
        if not trainer.is_global_zero or not rows:
            return
        folder = run_dir / "samples"
        step = max(trainer.global_step, getattr(module, "checkpoint_global_step", 0))  # a loaded checkpoint's
        name = f"test_step{step}"
        if rows[0].arm is not None:
            write_arms(folder / name, rows)
            return
        write_rows(folder / f"{name}.jsonl", folder / f"{name}_ranks.jsonl", rows)
        summary = summarize(rows)
        write_json_atomic(folder / f"{name}_summary.json", summary)
        rank_zero_info(
            f"Test samples: {folder / name}.jsonl (accuracy {summary['accuracy']:.4f} on {len(rows)} questions)"
        )

    def on_predict_end(self, trainer, module) -> None:
        rows, run_dir = getattr(module, "evaluation_rows", []), run_directory(trainer)
        if trainer.is_global_zero and rows:
            write_rows(run_dir / "predictions.jsonl", run_dir / "rank_logs.jsonl", rows)
            rank_zero_info(f"Predictions: {run_dir / 'predictions.jsonl'}")


def write_rows(path: Path, ranks_path: Path, rows: list[EvaluationRow]) -> None:
    """The rows' records to `path` and, when they carry rank logs, one line per sequence to `ranks_path`."""
    if any(row.ranks for row in rows):
        write_jsonl_atomic(ranks_path, [line for row in rows for line in row.rank_records()])
    write_jsonl_atomic(path, [row.record() for row in rows])


def write_arms(folder: Path, rows: list[EvaluationRow]) -> None:
    """Rows of several arms (e.g. baseline vs SLOT): `{arm}.jsonl` each, `summary.json`, a console table."""
    by_arm = rows_by_arm(rows)
    for arm, arm_rows in by_arm.items():
        write_jsonl_atomic(folder / f"{arm}.jsonl", [row.record() for row in arm_rows])
    summary = compare_arms(by_arm)
    write_json_atomic(folder / "summary.json", summary)
    print(arms_table(summary) + f"\nPer-question logs and summary.json: {folder}/", flush=True)


def compare_arms(by_arm: dict[str, list[EvaluationRow]]) -> dict:
    """Each arm's summary (accuracy, format accuracy, mean final loss) and the questions it fixed or broke
    relative to the first arm (the baseline)."""
    baseline_name = next(iter(by_arm))
    baseline = {row.id: row.correct for row in by_arm[baseline_name]}
    arms = {}
    for arm, rows in by_arm.items():
        entry = summarize(rows)
        if arm != baseline_name:
            entry["fixed"] = sorted(row.id for row in rows if row.correct and not baseline[row.id])
            entry["broken"] = sorted(row.id for row in rows if not row.correct and baseline[row.id])
        arms[arm] = entry
    return {"baseline": baseline_name, "arms": arms}


def arms_table(summary: dict) -> str:
    columns = ("accuracy", "format_accuracy", "mean_final_loss")
    lines = [f"{'arm':<28}{'questions':>10}" + "".join(f"{c:>17}" for c in columns) + f"{'fixed':>7}{'broken':>8}"]
    for arm, entry in summary["arms"].items():
        values = "".join(f"{entry[c]:>17.4f}" if c in entry else f"{'-':>17}" for c in columns)
        flips = f"{len(entry['fixed']):>7}{len(entry['broken']):>8}" if "fixed" in entry else f"{'-':>7}{'-':>8}"
        lines.append(f"{arm:<28}{entry['questions']:>10}{values}{flips}")
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """question / completion / prediction / gold / correct rows as a Markdown table for TensorBoard."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| question | completion | prediction | gold | correct |", "|---|---|---|---|---|"]
    for row in rows:
        completion = row["completion"] if "completion" in row else row["completions"][0]
        values = (row["question"], completion, row["prediction"], row["answer"], row["correct"])
        lines.append("| " + " | ".join(cell(value) for value in values) + " |")
    return "\n".join(lines)
