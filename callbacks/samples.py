"""Sample writer: what the model generated, as a TensorBoard table (validation) and JSONL files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from core.io import run_directory, write_json_atomic, write_jsonl_atomic
from evaluation.sampling_metrics import mean_metrics


class SampleWriter(L.Callback):
    """Collects the per-question rows that evaluation steps return ({"rows": [...]}) and writes them.

    - validation: `samples/val_step{step}.jsonl` and a table of `table_rows` rows in TensorBoard;
    - test: `samples/test_step{step}.jsonl` plus `samples/test_step{step}_summary.json`;
    - predict: `predictions.jsonl`.
    Rows with repeated samples carry per-question "metrics" (maj@k, pass@k): the test summary averages them.
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

    def on_test_epoch_end(self, trainer, module) -> None:
        rows, run_dir = self._gathered_rows(), run_directory(trainer)
        if not trainer.is_global_zero or not rows:
            return
        folder = run_dir / "samples"
        step = max(trainer.global_step, getattr(module, "checkpoint_global_step", 0))  # a loaded checkpoint's
        name = f"test_step{step}"
        if any("arm" in row for row in rows):
            write_arms(folder / name, rows)
            return
        rows = write_rank_logs(folder / f"{name}_ranks.jsonl", rows)
        write_jsonl_atomic(folder / f"{name}.jsonl", rows)
        accuracy = sum(row["correct"] for row in rows) / len(rows)
        summary = {"questions": len(rows), "accuracy": accuracy}
        if "completions" in rows[0]:  # repeated sampling: accuracy is the majority vote over all samples
            summary.update(samples_per_question=len(rows[0]["completions"]), **mean_metrics(rows))
        write_json_atomic(folder / f"{name}_summary.json", summary)
        rank_zero_info(f"Test samples: {folder / name}.jsonl (accuracy {accuracy:.4f} on {len(rows)} questions)")

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


def write_arms(folder: Path, rows: list[dict]) -> None:
    """Rows of several arms (e.g. baseline vs SLOT): `{arm}.jsonl` each, `summary.json`, a console table."""
    by_arm: dict[str, list[dict]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], []).append(row)
    for arm, arm_rows in by_arm.items():
        write_jsonl_atomic(folder / f"{arm}.jsonl", arm_rows)
    summary = compare_arms(by_arm)
    write_json_atomic(folder / "summary.json", summary)
    print(arms_table(summary) + f"\nPer-question logs and summary.json: {folder}/", flush=True)


def compare_arms(by_arm: dict[str, list[dict]]) -> dict:
    """Accuracy (and format accuracy / mean final loss when rows carry them) per arm, and the questions each
    arm fixed or broke relative to the first arm (the baseline)."""
    baseline_name = next(iter(by_arm))
    baseline = {row["id"]: row["correct"] for row in by_arm[baseline_name]}
    arms = {}
    for arm, rows in by_arm.items():
        entry = {"questions": len(rows), "accuracy": sum(row["correct"] for row in rows) / len(rows)}
        if "format_ok" in rows[0]:
            entry["format_accuracy"] = sum(row["format_ok"] for row in rows) / len(rows)
        if "slot_loss" in rows[0]:
            entry["mean_final_loss"] = sum(row["slot_loss"][-1] for row in rows) / len(rows)
        if arm != baseline_name:
            entry["fixed"] = sorted(row["id"] for row in rows if row["correct"] and not baseline[row["id"]])
            entry["broken"] = sorted(row["id"] for row in rows if not row["correct"] and baseline[row["id"]])
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
