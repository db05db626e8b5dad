"""Surviving SLURM's time limit: hpc checkpoint, self-requeue and resume, with Lightning's SLURM support.

Under `srun`, Lightning detects the SLURM environment (ranks, world size, master address) and, with
`#SBATCH --signal=SIGUSR1@90` and `--requeue`, its own handler saves `hpc_ckpt_<n>.ckpt` in
`trainer.default_root_dir`, runs `scontrol requeue` and, on restart without `--ckpt_path`, resumes from it.

This callback keeps that protocol but moves the save out of the signal handler: the handler only records
the signal, and the checkpoint is written at the next optimizer-step boundary, or the next validation batch
boundary when the signal arrives during validation, after every rank agreed. A `test` run stops at its next
test batch the same way, without a checkpoint: the requeued job runs it again.
A checkpoint written inside a signal handler can capture a half-done step (and under DDP deadlock against
a collective in flight: Lightning-AI/pytorch-lightning#21406); one written at a boundary resumes bit-exactly. It also
warns about the failure modes users report: python started without srun (no ranks, no requeue), a SIGTERM
arriving with no requeue signal before it (the `--signal` line is missing or went to the batch shell only),
and `scontrol` missing (containers).

Outside SLURM (or with `auto_requeue=False`), a SIGTERM during `fit` (a scheduler's kill, `docker stop`, a
wrapper's timeout) is handled the same way, without the requeue: the checkpoint is saved at the next step boundary
into the run's checkpoint folder (`stopped-epoch<E>-step<S>.ckpt`, which `--ckpt_path last` resumes exactly), and
`fit` ends with one line saying so and exit code 143, never as if it had finished (Lightning's own SIGTERM handling
saves nothing and exits 0).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.lightning_internals import cluster_environment
from core.errors import TrainingInterrupted
from core.run_directory import run_directory

log = logging.getLogger(__name__)
REQUEUE_EXIT_CODE = 124  # the exit status of a job stopped for the time limit


def slurm_job_id() -> str | None:
    """The job id `scontrol requeue` takes (array jobs: <array job>_<task>)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def next_hpc_checkpoint(folder: Path) -> Path:
    """`hpc_ckpt_<n+1>.ckpt` after the highest existing n (the name Lightning resumes from)."""
    numbers = [
        int(m.group(1)) for p in folder.glob("hpc_ckpt_*.ckpt") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return folder / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(L.Callback):
    """On SLURM's requeue signal (or a bare SIGTERM), save an hpc checkpoint at the next optimizer step (or
    validation batch), requeue the job and stop. Outside SLURM or with `plugins: SLURMEnvironment(auto_requeue=False)`,
    a SIGTERM during `fit` saves a checkpoint the same way and stops with one line (exit code 143)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.previous_handlers: dict[int, object] = {}
        self.last_step = -1
        self.requeueing = False
        self.outside_slurm = False  # listening for a plain SIGTERM: save and stop, no requeue

    @staticmethod
    def requeue_pending(trainer: L.Trainer) -> bool:
        """Whether a SlurmRequeue of `trainer` got the time-limit signal (and saves or is about to save its hpc
        checkpoint): work that can wait for the requeued job, like scoring likelihood dynamics, should."""
        return any(
            isinstance(callback, SlurmRequeue) and (callback.requeueing or callback.signal_name is not None)
            for callback in trainer.callbacks
        )

    @staticmethod
    def environment(trainer: L.Trainer) -> SLURMEnvironment | None:
        environment = cluster_environment(trainer)
        return environment if isinstance(environment, SLURMEnvironment) and environment.auto_requeue else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or "SLURM_JOB_ID" not in os.environ or not trainer.is_global_zero:
            return
        if "SLURM_STEP_ID" not in os.environ or SLURMEnvironment.job_name() in ("bash", "interactive"):
            log.warning(
                "SLURM job %s: this process was not started by srun, so Lightning's SLURM support (ranks, hpc "
                "checkpoint and requeue at the time limit) is off. Launch it as `srun python cli.py fit ...` "
                "(the scripts of `cli.py scaffold` do).",
                os.environ["SLURM_JOB_ID"],
            )
        elif self.environment(trainer) is not None and shutil.which("scontrol") is None:
            log.warning(
                "scontrol is not on PATH (a container?): at the time limit the hpc checkpoint is still saved in "
                "%s, but the job cannot requeue itself; resubmit the same script to resume.",
                trainer.default_root_dir,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._listen(trainer)  # `test`: requeued and run again from its start (no training state to save)

    def _listen(self, trainer: L.Trainer) -> None:
        environment = self.environment(trainer)
        if environment is not None:
            signals = (environment.requeue_signal, signal.SIGTERM)
        elif trainer.state.fn == TrainerFn.FITTING:
            signals, self.outside_slurm = (signal.SIGTERM,), True
        else:
            return
        self.last_step = trainer.global_step
        # Lightning registered its handlers just before the run started: record instead of saving in them.
        for signum in signals:
            self.previous_handlers[signum] = signal.signal(signum, self._record_signal)
        if trainer.received_sigterm:  # arrived before this handler replaced Lightning's
            self._record_signal(signal.SIGTERM, None)

    def _record_signal(self, signum: int, frame) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            if signum == signal.SIGTERM and not self.outside_slurm:
                log.warning(
                    "SIGTERM arrived with no requeue signal before it: add `#SBATCH --signal=SIGUSR1@90` (sent to "
                    "srun's tasks; `B:` sends it to the batch shell only). Saving at the next step anyway."
                )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.previous_handlers or trainer.global_step == self.last_step:
            return  # not on SLURM, or mid gradient accumulation: not a step boundary
        self.last_step = trainer.global_step
        self._requeue_if_signalled(trainer)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        # Validation inside `fit` (64 questions x 256 generated tokens) can outlast the warning: the training
        # state is that of the last optimizer step, and the restarted job finishes this validation first.
        if self.previous_handlers:
            self._requeue_if_signalled(trainer)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.previous_handlers:
            self._requeue_if_signalled(trainer)

    def _requeue_if_signalled(self, trainer: L.Trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.signal_name is not None, all=False):
            return
        self.requeueing = True  # every rank: no dynamics scoring on this save
        if self.outside_slurm:
            self._save_and_stop(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            path = trainer.strategy.broadcast(next_hpc_checkpoint(Path(trainer.default_root_dir)))
            trainer.save_checkpoint(path, weights_only=False)  # the full training state
            saved = f"saved {path} at step {trainer.global_step}"
        else:
            saved = f"{trainer.state.fn.value} stopped (its outputs are written only at its end); it runs again"
        if trainer.is_global_zero:
            log.warning("%s: %s", self.signal_name or "signal", saved)
            requeue()
        # Stop every rank now, never with success: if the requeue failed, the job must not count as completed
        # (evaluations wait on `afterok`). A requeued `fit` resumes from `path`.
        raise SIGTERMException(REQUEUE_EXIT_CODE)

    def _save_and_stop(self, trainer: L.Trainer) -> None:
        """Outside SLURM: save the training state where `--ckpt_path last` finds it, and stop with one line."""
        folders = [c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        folder = Path(folders[0]) if folders else run_directory(trainer) / "checkpoints"
        name = f"stopped-epoch{trainer.current_epoch}-step{trainer.global_step}.ckpt"
        path = trainer.strategy.broadcast(folder / name)
        trainer.save_checkpoint(path, weights_only=False)
        if not trainer.is_global_zero:
            raise SIGTERMException(TrainingInterrupted.exit_code)  # rank 0 tells the user
        raise TrainingInterrupted(
            f"{self.signal_name}: training stopped at step {trainer.global_step}, its state saved to {path}; "
            "resume it with the same command and --ckpt_path last"
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before the Trainer's own teardown, which then restores the handlers of before `fit`
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def requeue() -> None:
    """`scontrol requeue <job>`; a failure is a warning (the checkpoint is saved: resubmit to resume)."""
    job_id = slurm_job_id()
    try:
        result = subprocess.run(["scontrol", "requeue", str(job_id)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.warning("scontrol not found: the job was not requeued; resubmit the same script to resume")
        return
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s", job_id)
    else:
        log.warning("scontrol requeue %s failed (%s): resubmit the same script", job_id, result.stderr.strip())
