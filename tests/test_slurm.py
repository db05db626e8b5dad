"""SLURM: SIGUSR1 at the time limit -> hpc checkpoint at a step boundary -> scontrol requeue -> exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import REPO, assert_same_final_weights, fake_commands, run_dir, run_main, tiny_args

from callbacks.slurm import SlurmRequeue


def slurm_environment(bin_dir: Path) -> dict[str, str]:
    """What srun gives one task of a one-node, one-task job (no srun executable needed)."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    environment.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHONPATH=f"{REPO / 'tests'}:{REPO}",
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="finetune", SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1",
        SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NODELIST="localhost",
    )  # fmt: skip
    return environment


def assert_restart_resumes_exactly(command: list[str], bin_dir: Path, straight: Path, slurm: Path) -> None:
    """The requeued job (the same command) resumes from the hpc checkpoint and ends with the uninterrupted run's
    trainable weights, bit for bit."""
    restart = subprocess.run(command, env=slurm_environment(bin_dir), capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in restart.stderr + restart.stdout
    assert_same_final_weights(straight, slurm)


@pytest.mark.slow
def test_sigusr1_saves_an_hpc_checkpoint_requeues_and_the_restart_resumes_exactly(tiny_llama, tmp_path):
    straight, slurm = tmp_path / "straight", tmp_path / "slurm"
    packing = ("--data.packing", "true")  # packed batches (and the chunked loss) resume exactly too
    assert run_main(["fit", *tiny_args(tiny_llama, straight, "--trainer.max_epochs", "2", *packing)]) == 0

    bin_dir = fake_commands(tmp_path / "bin", ("scontrol",))
    progress = tmp_path / "step.txt"
    reporter = json.dumps({"class_path": "helpers.ReportSteps", "init_args": {"path": str(progress)}})
    args = tiny_args(tiny_llama, slurm, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(slurm),
                     "--trainer.logger.init_args.version", "0", *packing)  # fmt: skip
    command = [sys.executable, str(REPO / "cli.py"), "fit", *args]
    first = subprocess.Popen([*command, f"--trainer.callbacks+={reporter}"], env=slurm_environment(bin_dir),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (progress.is_file() and progress.read_text() in {"2", "3"}) and first.poll() is None:
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=SIGUSR1@90` delivers to srun's tasks
    output = first.communicate(timeout=240)[0]
    assert first.returncode == 124, output  # stopped after requeueing, never "completed"
    assert [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()] == [
        ["scontrol", "requeue", "4242"]
    ]
    (hpc,) = slurm.glob("hpc_ckpt_*.ckpt")
    saved_at = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= saved_at < 8

    # The requeued job runs the same command; Lightning resumes from the hpc checkpoint by itself.
    assert_restart_resumes_exactly(command, bin_dir, straight, slurm)


@pytest.mark.slow
def test_sigusr1_during_validation_saves_at_a_validation_batch_and_the_restart_resumes_exactly(tiny_llama, tmp_path):
    """Validation (here 4 one-question batches after step 4) can outlast SLURM's warning: the signal is honoured
    at the next validation batch, the hpc save skips dynamics scoring, and the restart finishes the epoch."""
    settings = ["--trainer.max_epochs", "2", "--data.eval_batch_size", "1"]
    straight, slurm = tmp_path / "straight", tmp_path / "slurm"
    assert run_main(["fit", *tiny_args(tiny_llama, straight, *settings)]) == 0

    bin_dir = fake_commands(tmp_path / "bin", ("scontrol",))
    progress = tmp_path / "validation.txt"
    reporter = json.dumps({"class_path": "helpers.ReportEvaluation", "init_args": {"path": str(progress)}})
    dynamics = json.dumps({"class_path": "callbacks.dynamics.LikelihoodDynamics", "init_args": {"types": ["test"]}})
    args = tiny_args(tiny_llama, slurm, *settings, "--trainer.default_root_dir", str(slurm),
                     "--trainer.logger.init_args.version", "0", f"--trainer.callbacks+={dynamics}")  # fmt: skip
    command = [sys.executable, str(REPO / "cli.py"), "fit", *args]
    first = subprocess.Popen([*command, f"--trainer.callbacks+={reporter}"], env=slurm_environment(bin_dir),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (progress.is_file() and progress.read_text() == "4 0") and first.poll() is None:
        assert time.monotonic() < deadline, "validation did not start"
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)  # while validation batch 0 of 4 ends
    output = first.communicate(timeout=240)[0]
    assert first.returncode == 124, output
    assert progress.read_text() in {"4 0", "4 1", "4 2"}, output  # stopped during that validation...
    assert [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()] == [
        ["scontrol", "requeue", "4242"]
    ]
    (hpc,) = slurm.glob("hpc_ckpt_*.ckpt")
    assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 4  # ...not at step 5
    scored = sorted(path.name for path in (run_dir(slurm) / "dynamics/checkpoints").glob("*.json"))
    assert scored == ["base_model.json"]  # the hpc save scored nothing

    assert_restart_resumes_exactly(command, bin_dir, straight, slurm)


@pytest.mark.slow
def test_sigusr1_during_test_requeues_at_a_test_batch_without_a_checkpoint(tiny_llama, tmp_path):
    bin_dir = fake_commands(tmp_path / "bin", ("scontrol",))
    progress = tmp_path / "test.txt"
    reporter = json.dumps({"class_path": "helpers.ReportEvaluation", "init_args": {"path": str(progress)}})
    args = tiny_args(tiny_llama, tmp_path, "--data.eval_batch_size", "1", "--data.test_limit", "4",
                     "--trainer.default_root_dir", str(tmp_path), f"--trainer.callbacks+={reporter}")  # fmt: skip
    job = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "test", *args], env=slurm_environment(bin_dir),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (progress.is_file() and progress.read_text() == "0 0") and job.poll() is None:
        assert time.monotonic() < deadline, "the test loop did not start"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    output = job.communicate(timeout=240)[0]
    assert job.returncode == 124, output  # never "completed": the requeued job runs the test again
    assert progress.read_text() in {"0 0", "0 1", "0 2"}, output  # stopped before its last batch
    assert [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()] == [
        ["scontrol", "requeue", "4242"]
    ]
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("test_step*"))  # nothing half-written


class Rank0:
    is_global_zero = True
    default_root_dir = "."


def test_a_process_not_started_by_srun_is_warned_about(monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    SlurmRequeue().setup(Rank0(), None, "fit")
    assert "not started by srun" in caplog.text


def test_missing_scontrol_is_warned_about(monkeypatch, caplog, tmp_path):
    environment = slurm_environment(tmp_path)  # no fake scontrol in tmp_path
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    SlurmRequeue().setup(trainer, None, "fit")
    assert "scontrol is not on PATH" in caplog.text


def test_a_bare_sigterm_is_recorded_with_a_warning(caplog):
    callback = SlurmRequeue()
    callback._record_signal(signal.SIGTERM, None)
    callback._record_signal(signal.SIGUSR1, None)  # the first signal names the event
    assert callback.signal_name == "SIGTERM" and "SIGTERM arrived with no requeue signal" in caplog.text
