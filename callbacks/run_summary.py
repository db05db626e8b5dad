"""Tells the user where a run's outputs are: at the start of fit, and what was written at its end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from callbacks.export import EpochExport
from core.io import run_directory


def export_directory(trainer: L.Trainer, run_dir: Path) -> Path:
    """Where the EpochExport callback writes `epoch_N/` (the run directory unless configured)."""
    dirpaths = [callback.dirpath for callback in trainer.callbacks if isinstance(callback, EpochExport)]
    return Path(dirpaths[0]) if dirpaths and dirpaths[0] else run_dir


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
        print("\n".join(lines) + "\n", flush=True)
