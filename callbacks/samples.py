"""Sample writer: what the model generated, as a TensorBoard table (validation) and JSONL files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from callbacks.contracts import EvaluatesRows, require
from core.io import write_json_atomic, write_jsonl_atomic
from core.run_directory import run_directory
from evaluation.rows import EvaluationRow, rows_by_arm
from evaluation.summaries import arms_summary, arms_table, evaluation_summary, summary_table


class SampleWriter(L.Callback):
    """Writes the rows of every evaluation epoch: the module's gathered `evaluation_rows` (typed rows, the same
    on every process, from which the module also logged its metrics).

    - validation: `samples/val_step{step}.jsonl`, a table of `table_rows` rows and the summary in TensorBoard;
    - test: `samples/test_step{step}.jsonl` plus `samples/test_step{step}_summary.json`; rows of several arms
      (SLOT) go to `samples/test_step{step}/{arm}.jsonl` plus `summary.json`;
    - predict: `predictions.jsonl`.
    Summaries (evaluation/summaries.py) give every accuracy, maj@k and pass@k with its 95 % interval and each arm's
    paired comparison with the baseline; they are printed and go to TensorBoard text (`test/summary`, `test/arms`).
    Rank logs (one entry per sample) go to `<name>_ranks.jsonl` beside the samples (`rank_logs.jsonl` for
    predict): one line per sequence {"id", "sample", "low_confidence_ranks", "low_probability_ranks"}, in the
    samples' order. Everything under the run's log directory, written atomically by rank 0.
    """

    def __init__(self, table_rows: int = 4) -> None:
        self.table_rows = table_rows

    def setup(self, trainer, module, stage: str) -> None:
        require(self, "model", module, EvaluatesRows)

    def on_validation_end(self, trainer, module) -> None:
        rows, run_dir = module.evaluation_rows, run_directory(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not rows:
            return
        name = f"val_step{trainer.global_step}"
        write_rows(run_dir / "samples" / f"{name}.jsonl", run_dir / "samples" / f"{name}_ranks.jsonl", rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                text = markdown_table([row.record() for row in rows[: self.table_rows]])
                logger.experiment.add_text("val/samples", text, trainer.global_step)
        log_table(trainer, "val/summary", summary_table(evaluation_summary([row.record() for row in rows])))

    def on_test_end(self, trainer, module) -> None:
        rows, run_dir = module.evaluation_rows, run_directory(trainer)
        if not trainer.is_global_zero or not rows:
            return
        folder = run_dir / "samples"
        step = max(trainer.global_step, module.checkpoint_global_step)  # a loaded checkpoint's
        name = f"test_step{step}"
        if rows[0].arm is not None:
            log_table(trainer, "test/arms", write_arms(folder / name, rows))
            return
        write_rows(folder / f"{name}.jsonl", folder / f"{name}_ranks.jsonl", rows)
        summary = evaluation_summary([row.record() for row in rows])
        write_json_atomic(folder / f"{name}_summary.json", summary)
        log_table(trainer, "test/summary", summary_table(summary))
        rank_zero_info(f"{summary_table(summary)}\nTest samples: {folder / name}.jsonl, summary: {name}_summary.json")

    def on_predict_end(self, trainer, module) -> None:
        rows, run_dir = module.evaluation_rows, run_directory(trainer)
        if trainer.is_global_zero and rows:
            write_rows(run_dir / "predictions.jsonl", run_dir / "rank_logs.jsonl", rows)
            rank_zero_info(f"Predictions: {run_dir / 'predictions.jsonl'}")


def write_rows(path: Path, ranks_path: Path, rows: list[EvaluationRow]) -> None:
    """The rows' records to `path` and, when they carry rank logs, one line per sequence to `ranks_path`."""
    if any(row.ranks for row in rows):
        write_jsonl_atomic(ranks_path, [line for row in rows for line in row.rank_records()])
    write_jsonl_atomic(path, [row.record() for row in rows])


def write_arms(folder: Path, rows: list[EvaluationRow]) -> str:
    """Rows of several arms (e.g. baseline vs SLOT): `{arm}.jsonl` each, `summary.json` with each arm's paired
    comparison to the first (the baseline), and a console table (printed and returned)."""
    by_arm = {arm: [row.record() for row in arm_rows] for arm, arm_rows in rows_by_arm(rows).items()}
    for arm, records in by_arm.items():
        write_jsonl_atomic(folder / f"{arm}.jsonl", records)
    summary = arms_summary(by_arm)
    write_json_atomic(folder / "summary.json", summary)
    table = arms_table(summary)
    print(table + f"\nPer-question logs and summary.json: {folder}/", flush=True)
    return table


def log_table(trainer, tag: str, table: str) -> None:
    """A console table as TensorBoard text (indented: Markdown shows it as a fixed-width block)."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            text = "\n".join("    " + line for line in table.splitlines())
            logger.experiment.add_text(tag, text, trainer.global_step)


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
