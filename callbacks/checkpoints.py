"""Checkpoints that are complete or absent, and that resume as what they are (on by default, like SlurmRequeue).

- Every checkpoint is written to a hidden `.NAME-partial-XXXX` file beside NAME, flushed to disk, then renamed
  (`AtomicCheckpointIO`): a full disk, or any other OSError, never leaves a truncated `.ckpt` (nor, on the next
  save, a `-v1` name beside one), and `last.ckpt` keeps pointing at the newest complete checkpoint. The failure
  is one line (`NotSaved`); staging files that a killed process left are removed at the next start.
- Lightning runs the epoch-end hooks, checkpoints included, when training stops mid-epoch (`max_steps`, early
  stopping), and the checkpoint then records the epoch as finished: a resume with a larger `max_steps` trained
  nothing. Such a checkpoint records the epoch as unfinished here, as one saved at that optimizer step does, so
  the resume trains the rest of the epoch.
- A resumed run keeps refreshing `last.ckpt` instead of starting a `last-v1.ckpt` beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from core.errors import NotSaved
from core.io import atomic_path, remove_partial

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a staging file in the checkpoint's folder, fsync, rename: a checkpoint is complete or
    absent. An OSError (a full disk, a quota, a lost mount) is one `NotSaved` line; the staging file is removed."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if not _is_local_file_protocol(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with atomic_path(path) as staging:
                super().save_checkpoint(checkpoint, staging, storage_options)
                fsync(staging)
        except OSError as error:
            kept = any(not other.name.startswith(".") for other in path.parent.glob("*.ckpt"))
            advice = (
                "the checkpoints saved before it are kept: make room, then resume with --ckpt_path last"
                if kept
                else "no checkpoint was saved before it: make room, then start again"
            )
            raise NotSaved(
                f"could not save the checkpoint '{path}': {error.strerror or error}; no partial file was left, and "
                f"{advice}"
            ) from error


def fsync(path: Path) -> None:
    """Flush `path`'s data to the disk, so the rename never publishes a file whose blocks were not written."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def epoch_finished(trainer: L.Trainer) -> bool:
    """Whether the current training epoch went through all its batches (not stopped early by max_steps,
    early stopping or a signal)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.completed >= trainer.num_training_batches


def checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    """The folders the run's checkpoint callbacks write to."""
    return [Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]


class SafeCheckpoints(L.Callback):
    """Atomic checkpoint files, leftovers of a killed save removed, mid-epoch stops resumable (module docstring)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # a plugin the user chose is left as it is
            strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {*checkpoint_folders(trainer), Path(trainer.default_root_dir)}
        removed = [path for folder in sorted(folders) for path in remove_partial(folder, "*.ckpt")]
        if removed:
            log.warning("removed %d partial checkpoint file(s) an interrupted save left: %s", len(removed), removed[0])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        # A checkpoint records `last_model_path` as it was before its own `last` link was made (empty in the
        # first one): resumed from it, ModelCheckpoint would take the existing last.ckpt for another run's and
        # write last-v1.ckpt, leaving last.ckpt behind. It is this run's: keep refreshing it.
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or callback.last_model_path:
                continue
            name = callback.CHECKPOINT_NAME_LAST
            last = Path(callback.dirpath or ".") / f"{name}{callback.FILE_EXTENSION}"
            if "{" not in name and (last.is_file() or last.is_symlink()):
                callback.last_model_path = str(last)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING or "loops" not in checkpoint:
            return
        epochs = trainer.fit_loop.epoch_progress.current
        if epochs.processed == epochs.completed or epoch_finished(trainer):
            return  # not in the epoch-end hooks, or the epoch did end
        # Saved from the epoch-end hooks of an epoch that training left early: record the state of a checkpoint
        # saved at this optimizer step (on_train_batch_end), which Lightning resumes mid-epoch.
        state = checkpoint["loops"]["fit_loop"]
        batches = state["epoch_loop.batch_progress"]
        if any(batches[scope]["completed"] != batches[scope]["processed"] for scope in ("total", "current")):
            return
        for scope in ("total", "current"):
            state["epoch_progress"][scope]["processed"] -= 1
            batches[scope]["completed"] -= 1
        state["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1
