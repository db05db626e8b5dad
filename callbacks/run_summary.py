"""Tells the user where a run's outputs are: at the start of fit, and what was written at its end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


def run_directory(trainer: L.Trainer) -> Path:
    """The run's log directory. Call it on EVERY rank: under DDP `trainer.log_dir` is a broadcast."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class RunSummary(L.Callback):
    """Prints the run directory, the TensorBoard command, the checkpoints and the epoch exports."""

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._print_start(trainer, run_directory(trainer))

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._print_end(trainer, run_directory(trainer))

    @rank_zero_only
    def _print_start(self, trainer: L.Trainer, run_dir: Path) -> None:
        checkpoints = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        print(
            f"\nRun directory:  {run_dir}\n"
            f"TensorBoard:    tensorboard --logdir {run_dir.parent}\n"
            f"Checkpoints:    {checkpoints}\n"
            f"Epoch exports:  {run_dir}/epoch_<N>/\n",
            flush=True,
        )

    @rank_zero_only
    def _print_end(self, trainer: L.Trainer, run_dir: Path) -> None:
        lines = ["", f"Finished. Run directory: {run_dir}", f"  TensorBoard logs: {run_dir}"]
        if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
            for checkpoint in sorted(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")):
                lines.append(f"  checkpoint:       {checkpoint}")
        for export in sorted(run_dir.glob("epoch_*")):
            lines.append(f"  epoch export:     {export}")
        print("\n".join(lines) + "\n", flush=True)
