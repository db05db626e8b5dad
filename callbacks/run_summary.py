"""Tells the user where a run's outputs are: at the start of fit, and what was written at its end."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class RunSummary(L.Callback):
    """Prints the run directory, the TensorBoard command, the checkpoints and the epoch exports."""

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        checkpoints = trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else None
        print(
            f"\nRun directory:  {run_dir}\n"
            f"TensorBoard:    tensorboard --logdir {run_dir.parent}\n"
            f"Checkpoints:    {checkpoints}\n"
            f"Epoch exports:  {run_dir}/epoch_<N>/\n",
            flush=True,
        )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        run_dir = Path(trainer.log_dir or trainer.default_root_dir)
        lines = ["", f"Finished. Run directory: {run_dir}", f"  TensorBoard logs: {run_dir}"]
        if trainer.checkpoint_callback and trainer.checkpoint_callback.dirpath:
            for checkpoint in sorted(Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt")):
                lines.append(f"  checkpoint:       {checkpoint}")
        for export in sorted(run_dir.glob("epoch_*")):
            lines.append(f"  epoch export:     {export}")
        print("\n".join(lines) + "\n", flush=True)
