"""Sample writer: what the model generated, as a TensorBoard table (validation) and JSONL files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from core.io import run_directory, write_json_atomic, write_jsonl_atomic
from evaluation.summaries import arms_summary, arms_table, evaluation_summary, summary_table


class SampleWriter(L.Callback):
    """Collects the per-question rows that evaluation steps return ({"rows": [...]}) and writes them.

    - validation: `samples/val_step{step}.jsonl`, a table of `table_rows` rows and the summary in TensorBoard;
    - test: `samples/test_step{step}.jsonl` plus `samples/test_step{step}_summary.json`;
    - predict: `predictions.jsonl`.
    The test summary (evaluation/summaries.py) gives accuracy and, with repeated samples, the mean maj@k / pass@k
    with 95 % intervals; it is printed and goes to TensorBoard text (`test/summary`, `test/arms` for SLOT arms).
    Rows with rank logs ("ranks", one entry per sample) have them moved to `<name>_ranks.jsonl` beside the
    samples (`rank_logs.jsonl` for predict): one line per sequence {"id", "sample", "low_confidence_ranks",
    "low_probability_ranks"}, in the samples' order.
    All under the run's log directory, written atomically by rank 0 after gathering every rank's rows.
    """

    def __init__(self, table_rows: int = 4) -> None:
        self.table_rows = table_rows
        self.rows: list[dict] = []

    def _collect(self, outputs) -> None:
        if isinstance(outputs, dict) and "rows" in outputs:
            self.rows.extend(outputs["rows"])

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.rows = []

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs)

    def _gathered_rows(self) -> list[dict]:
        if not (dist.is_available() and dist.is_initialized()):
            return self.rows
        every_rank: list = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, self.rows)
        seen, rows = set(), []
        for row in (row for rank_rows in every_rank for row in rank_rows):
            if row["id"] not in seen:  # DistributedSampler pads ranks with repeated examples
                seen.add(row["id"])
                rows.append(row)
        return rows

    def on_validation_epoch_end(self, trainer, module) -> None:
        rows, run_dir = self._gathered_rows(), run_directory(trainer)
        if trainer.sanity_checking or not trainer.is_global_zero or not rows:
            return
        rows = write_rank_logs(run_dir / "samples" / f"val_step{trainer.global_step}_ranks.jsonl", rows)
        write_jsonl_atomic(run_dir / "samples" / f"val_step{trainer.global_step}.jsonl", rows)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/samples", markdown_table(rows[: self.table_rows]), trainer.global_step)
        log_table(trainer, "val/summary", summary_table(evaluation_summary(rows)))

    def on_test_epoch_end(self, trainer, module) -> None:
        rows, run_dir = self._gathered_rows(), run_directory(trainer)
        if not trainer.is_global_zero or not rows:
            return
        folder = run_dir / "samples"
        step = max(trainer.global_step, getattr(module, "checkpoint_global_step", 0))  # a loaded checkpoint's
        name = f"test_step{step}"
        if any("arm" in row for row in rows):
            log_table(trainer, "test/arms", write_arms(folder / name, rows))
            return
        rows = write_rank_logs(folder / f"{name}_ranks.jsonl", rows)
        write_jsonl_atomic(folder / f"{name}.jsonl", rows)
        summary = evaluation_summary(rows)
        write_json_atomic(folder / f"{name}_summary.json", summary)
        log_table(trainer, "test/summary", summary_table(summary))
        rank_zero_info(f"{summary_table(summary)}\nTest samples: {folder / name}.jsonl, summary: {name}_summary.json")

    def on_predict_epoch_end(self, trainer, module) -> None:
        rows, run_dir = self._gathered_rows(), run_directory(trainer)
        if trainer.is_global_zero and rows:
            path = run_dir / "predictions.jsonl"
            write_jsonl_atomic(path, write_rank_logs(run_dir / "rank_logs.jsonl", rows))
            rank_zero_info(f"Predictions: {path}")


def write_rank_logs(path: Path, rows: list[dict]) -> list[dict]:
    """Write the rows' rank logs (if any) to `path`, one line per sequence; the rows without them."""
    if not any("ranks" in row for row in rows):
        return rows
    lines = [
        {"id": row["id"], "sample": sample, **ranks}
        for row in rows
        for sample, ranks in enumerate(row.get("ranks", []))
    ]
    write_jsonl_atomic(path, lines)
    return [{key: value for key, value in row.items() if key != "ranks"} for row in rows]


def write_arms(folder: Path, rows: list[dict]) -> str:
    """Rows of several arms (e.g. baseline vs SLOT): `{arm}.jsonl` each, `summary.json`, a console table (returned)."""
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    for arm, arm_rows in by_arm.items():
        write_jsonl_atomic(folder / f"{arm}.jsonl", arm_rows)
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
