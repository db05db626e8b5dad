"""Tells the user where a run's outputs are: at the start of fit, and what was written and learned at its end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.contracts import HasValidationData, ScoresLoss, require
from callbacks.export import EpochExport
from callbacks.planning_report import PlanningReport
from core.run_directory import run_directory


def export_directory(trainer: L.Trainer, run_dir: Path) -> Path:
    """Where the EpochExport callback writes `epoch_N/` (the run directory unless configured)."""
    dirpaths = [callback.dirpath for callback in trainer.callbacks if isinstance(callback, EpochExport)]
    return Path(dirpaths[0]) if dirpaths and dirpaths[0] else run_dir


class RunSummary(L.Callback):
    """Prints the run directory, the TensorBoard command, the checkpoints and the epoch exports; at the end of
    fit also what training did: the validation loss before the first step vs. after the last validation, the
    share of validation completions that follow the planning layout, and the newest validation sample file.
    The loss before training is teacher-forced on the validation set (no generation) and logged as `val/loss`
    at the starting step."""

    def __init__(self) -> None:
        self.start: tuple[int, float] | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            require(self, "model", module, ScoresLoss)
            require(self, "datamodule", trainer.datamodule, HasValidationData)

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._print_start(trainer, run_directory(trainer))

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.start = None
        if not trainer.limit_val_batches:
            return
        self.start = (trainer.global_step, module.mean_loss(trainer.datamodule.val_dataloader()))
        for logger in trainer.loggers if trainer.is_global_zero else ():
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_scalar("val/loss", self.start[1], self.start[0])

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._print_end(trainer, run_directory(trainer))

    @rank_zero_only
    def _print_start(self, trainer: L.Trainer, run_dir: Path) -> None:
        checkpoints = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        print(
            f"\nRun directory:  {run_dir}\n"
            f"TensorBoard:    tensorboard --logdir {run_dir.parent}\n"
            f"Checkpoints:    {checkpoints}\n"
            f"Epoch exports:  {export_directory(trainer, run_dir)}/epoch_<N>/\n",
            flush=True,
        )

    @rank_zero_only
    def _print_end(self, trainer: L.Trainer, run_dir: Path) -> None:
        lines = ["", f"Finished. Run directory: {run_dir}", f"  TensorBoard logs: {run_dir}"]
        if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
            for checkpoint in sorted(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")):
                lines.append(f"  checkpoint:       {checkpoint}")
        for export in sorted(export_directory(trainer, run_dir).glob("epoch_[0-9]*")):
            lines.append(f"  epoch export:     {export}")
        lines += self._learned(trainer, run_dir)
        print("\n".join(lines) + "\n", flush=True)

    def _learned(self, trainer: L.Trainer, run_dir: Path) -> list[str]:
        """The lines on what training changed: validation loss, planning layout share, the newest sample file."""
        lines = []
        end = trainer.callback_metrics.get("val/loss")
        if self.start is not None and end is not None:
            (step, loss), now = self.start, trainer.global_step
            lines.append(f"  validation loss:  {loss:.4f} at step {step} -> {float(end):.4f} at step {now}")
        reports = [callback.latest for callback in trainer.callbacks if isinstance(callback, PlanningReport)]
        if reports and reports[0]:
            report = reports[0]
            followed = round(report["layout_share"] * report["questions"])
            lines.append(
                f"  planning layout:  {followed}/{report['questions']} validation completions follow it "
                f"(planning tokens, step text, answer line): {report['path']}"
            )
        samples = sorted(run_dir.glob("samples/val_step*.jsonl"), key=lambda path: int(path.stem[8:]))
        if samples:
            lines.append(f"  val samples:      {samples[-1]}")
        return lines
