"""Faults that lost work or lied, each on a tiny model: a checkpoint save that fails (a
real full disk on a small tmpfs, or an injected ENOSPC where mounting is not allowed), SIGTERM, `kill -9` during
the epoch export, and a resume with a larger max_steps. Each ends in one line, leaves nothing partial, and resumes
to the uninterrupted run's weights."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.fabric.plugins.io.torch_io as torch_io
import pytest
import torch
from helpers import REPO, assert_same_final_weights, run_dir, run_main, tiny_args, trainable_state
from safetensors.torch import load_file

from callbacks.checkpoints import AtomicCheckpointIO
from core.errors import NotSaved, UserInputError
from core.io import remove_partial
from core.run_directory import newest_checkpoint
from lightning_modules.schedules import WarmupCosineLR, refit_total_steps

TWO_EPOCHS = ("--trainer.max_epochs", "2")  # 16 examples in batches of 4: steps 0-3, then 4-7
FIXED_SCHEDULE = ("--model.init_args.scheduler.init_args.total_steps", "100")  # the same rates whatever max_steps


@pytest.fixture(scope="module")
def straight(tiny_llama, tmp_path_factory) -> Path:
    """The save_dir of an uninterrupted two-epoch run: the weights every interrupted and resumed run must reach."""
    save_dir = tmp_path_factory.mktemp("straight")
    assert run_main(["fit", *tiny_args(tiny_llama, save_dir, *TWO_EPOCHS)]) == 0
    return save_dir


def cli_environment() -> dict[str, str]:
    """A plain shell's environment (no SLURM job), with the test helpers importable by class_path."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    return environment | {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}


def error_lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def fail_saves_at_step(monkeypatch, step: int) -> None:
    """A checkpoint save at training step `step` writes half its bytes, then fails as on a full disk."""
    original = torch_io._atomic_save

    def half_then_full(checkpoint: dict, filepath) -> None:
        if checkpoint.get("global_step") != step:
            return original(checkpoint, filepath)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        with open(filepath, "wb") as file:
            file.write(buffer.getvalue()[: buffer.tell() // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))

    monkeypatch.setattr(torch_io, "_atomic_save", half_then_full)


def assert_failed_save_reported_and_nothing_partial(err: str, save_dir: Path) -> None:
    """The save of step 8 (the end of epoch 1) failed: one line, and the checkpoint folder holds epoch 0's complete
    checkpoints only, `last.ckpt` pointing at the newest of them."""
    folder = run_dir(save_dir) / "checkpoints"
    assert "Traceback" not in err
    (line,) = error_lines_of(err)
    assert line == (
        f"error: could not save the checkpoint '{folder / 'epoch1-step8.ckpt'}': No space left on device; no partial "
        "file was left, and the checkpoints saved before it are kept: make room, then resume with --ckpt_path last"
    )
    names = sorted(path.name for path in folder.iterdir())
    assert names == ["best-epoch0-step4.ckpt", "epoch0-step4.ckpt", "last.ckpt"]
    assert (folder / "last.ckpt").resolve() == (folder / "epoch0-step4.ckpt").resolve()


def mounted_tmpfs(folder: Path) -> bool:
    """Mount a 32 MB tmpfs on `folder`; False where mounting is not allowed (CI runs as root: it is)."""
    try:
        mount = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(folder)]
        return subprocess.run(mount, capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


@pytest.fixture
def disk_full_at_step_8(tmp_path, monkeypatch):
    """(save_dir, fit arguments, make_room): the disk fills at the end of epoch 1 (step 8), before that epoch's
    checkpoints are saved; epoch 0's (step 4) are complete. A real full disk on a small tmpfs where one can be
    mounted, else an injected ENOSPC that writes half the checkpoint first."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not mounted_tmpfs(disk):
        fail_saves_at_step(monkeypatch, 8)
        yield disk / "runs", [], monkeypatch.undo
        return
    filler = disk / "filler"
    fill = json.dumps({"class_path": "helpers.FillDiskAtEpochEnd", "init_args": {"path": str(filler), "step": 8}})
    try:
        yield disk / "runs", [f"--trainer.callbacks+={fill}"], filler.unlink
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_leaves_nothing_partial_and_resumes_exactly(
    tiny_llama, straight, disk_full_at_step_8, capsys
):
    save_dir, fill, make_room = disk_full_at_step_8
    assert run_main(["fit", *tiny_args(tiny_llama, save_dir, *TWO_EPOCHS, *fill)]) == 2
    assert_failed_save_reported_and_nothing_partial(capsys.readouterr().err, save_dir)

    make_room()
    assert run_main(["fit", *tiny_args(tiny_llama, save_dir, *TWO_EPOCHS, "--ckpt_path", "last")]) == 0
    folder = run_dir(save_dir) / "checkpoints"
    assert f"Resuming {folder / 'last.ckpt'} (step 4)" in capsys.readouterr().out
    assert_same_final_weights(straight, save_dir)
    assert not [path.name for path in folder.iterdir() if "-v" in path.name or path.name.startswith(".")]
    assert (folder / "last.ckpt").resolve() == (folder / "epoch1-step8.ckpt").resolve()


def wait_for(condition, job: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition() and job.poll() is None:
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_saves_stops_with_one_line_and_a_non_zero_exit_and_the_resume_is_exact(tiny_llama, straight, tmp_path):
    progress, output = tmp_path / "step.txt", tmp_path / "output.txt"
    reporter = json.dumps({"class_path": "helpers.ReportSteps", "init_args": {"path": str(progress)}})
    args = tiny_args(tiny_llama, tmp_path, *TWO_EPOCHS, "--trainer.logger.init_args.version", "0")
    with open(output, "w") as log:
        job = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", *args, f"--trainer.callbacks+={reporter}"],
                               env=cli_environment(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        wait_for(lambda: progress.is_file() and progress.read_text() in {"2", "3"}, job, "training did not start")
        job.send_signal(signal.SIGTERM)  # what a scheduler, `docker stop` or a wrapper's timeout sends
        job.wait(timeout=240)
    text = output.read_text()
    assert job.returncode == 143, text[-3000:]  # never "finished"
    (saved,) = (run_dir(tmp_path) / "checkpoints").glob("stopped-*.ckpt")
    step = torch.load(saved, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= step < 8 and saved.name == f"stopped-epoch0-step{step}.ckpt"
    assert error_lines_of(text) == [
        f"error: SIGTERM: training stopped at step {step}, its state saved to {saved}; resume it with the same "
        "command and --ckpt_path last"
    ]
    assert "Traceback" not in text

    assert run_main(["fit", *args, "--ckpt_path", "last"]) == 0
    assert_same_final_weights(straight, tmp_path)


@pytest.mark.slow
def test_a_kill_during_the_export_keeps_the_epoch_and_the_next_start_cleans_up_and_exports_it(
    tiny_llama, straight, tmp_path
):
    killer = json.dumps({"class_path": "helpers.KillDuringExport"})
    args = tiny_args(tiny_llama, tmp_path, *TWO_EPOCHS, "--trainer.logger.init_args.version", "0")
    with open(tmp_path / "output.txt", "w") as log:
        job = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", *args, f"--trainer.callbacks+={killer}"],
                             env=cli_environment(), stdout=log, stderr=subprocess.STDOUT, timeout=600)  # fmt: skip
    assert job.returncode == -signal.SIGKILL, (tmp_path / "output.txt").read_text()[-3000:]
    run = run_dir(tmp_path)
    (partial,) = run.glob(".epoch_0-partial-*")
    assert (partial / "model.safetensors").is_file() and not (run / "epoch_0").exists()
    # epoch 0's checkpoint was saved before its export: the epoch is not lost
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4

    assert run_main(["fit", *args, "--ckpt_path", "last"]) == 0
    assert not list(run.glob(".epoch_*"))  # the staging folder is gone
    assert sorted(path.name for path in run.glob("epoch_*")) == ["epoch_0", "epoch_1"]
    assert json.loads((run / "epoch_0/training_info.json").read_text())["global_step"] == 4
    expected, actual = (load_file(folder / "epoch_0/model.safetensors") for folder in (run_dir(straight), run))
    assert expected.keys() == actual.keys() and all(torch.equal(actual[key], expected[key]) for key in expected)
    assert_same_final_weights(straight, tmp_path)


@pytest.mark.slow
def test_a_resume_with_a_larger_max_steps_trains_the_rest_of_the_epoch_and_exports_it_once_complete(
    tiny_llama, tmp_path
):
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    assert run_main(["fit", *tiny_args(tiny_llama, stopped, *FIXED_SCHEDULE, "--trainer.max_steps", "2")]) == 0
    run = run_dir(stopped)
    assert not list(run.glob("epoch_*"))  # half an epoch is not exported as epoch_0/

    resume = ["--trainer.max_steps", "4", "--ckpt_path", "last"]
    assert run_main(["fit", *tiny_args(tiny_llama, stopped, *FIXED_SCHEDULE, *resume)]) == 0
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 4
    assert json.loads((run / "epoch_0/training_info.json").read_text())["global_step"] == 4  # the whole epoch

    assert run_main(["fit", *tiny_args(tiny_llama, straight, *FIXED_SCHEDULE, "--trainer.max_steps", "4")]) == 0
    assert_same_final_weights(straight, stopped)


@pytest.mark.slow
def test_a_resume_with_a_larger_max_steps_stretches_the_estimated_schedule(tiny_llama, tmp_path, caplog):
    """The schedule's length, estimated from max_steps 2, ends its decay at step 2: restored as it was, it would
    train steps 2 and 3 at a learning rate of zero."""
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--trainer.max_steps", "2")]) == 0
    before = trainable_state(run_dir(tmp_path) / "checkpoints/last.ckpt")
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last")]) == 0
    assert "the learning-rate schedule restored from the checkpoint ends at step 2; this run trains to step 4" in (
        caplog.text
    )
    after = trainable_state(run_dir(tmp_path) / "checkpoints/last.ckpt")
    assert any(not torch.equal(before[key], after[key]) for key in before)


def test_refit_total_steps_recomputes_the_rate_of_the_current_step():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, warmup=0, total_steps=2)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.0  # the end of a 2-step decay
    assert refit_total_steps(scheduler, 2) is None
    assert refit_total_steps(scheduler, 4) == 2
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5) == scheduler.get_last_lr()[0]  # cos at half-way


def test_an_atomic_checkpoint_save_leaves_a_complete_file_or_none(tmp_path, monkeypatch):
    checkpoint = {"global_step": 3, "state_dict": {"w": torch.arange(1000.0)}}
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "good.ckpt")
    assert [path.name for path in tmp_path.iterdir()] == ["good.ckpt"]
    assert torch.equal(torch.load(tmp_path / "good.ckpt", weights_only=True)["state_dict"]["w"], torch.arange(1000.0))

    fail_saves_at_step(monkeypatch, 3)
    with pytest.raises(NotSaved, match=r"could not save the checkpoint '.*bad.ckpt': No space left on device; "):
        AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "bad.ckpt")
    assert [path.name for path in tmp_path.iterdir()] == ["good.ckpt"]  # no partial file, hidden or not


def test_newest_checkpoint_is_the_readable_one_of_the_highest_step(tmp_path):
    def save(name: str, step: int) -> Path:
        torch.save({"global_step": step, "state_dict": {"w": torch.zeros(2)}}, tmp_path / name)
        return tmp_path / name

    with pytest.raises(UserInputError, match="no complete checkpoint in"):
        newest_checkpoint(tmp_path)
    save("epoch0-step2.ckpt", 2)
    (tmp_path / "last.ckpt").symlink_to("epoch0-step2.ckpt")  # left behind: the next run wrote last-v1.ckpt
    assert newest_checkpoint(tmp_path) == (tmp_path / "last.ckpt", 2)
    newer = save("epoch0-step3.ckpt", 3)
    (tmp_path / "last-v1.ckpt").symlink_to(newer.name)
    truncated = save("epoch1-step4.ckpt", 4)
    truncated.write_bytes(truncated.read_bytes()[:100])  # cut short by a full disk
    save(".epoch1-step4.ckpt-partial-x1y2", 4)  # a save in progress
    assert newest_checkpoint(tmp_path) == (newer, 3)


def test_remove_partial_removes_staging_leftovers_and_restores_an_interrupted_swap(tmp_path):
    (tmp_path / ".epoch_0-partial-ab12").mkdir()
    (tmp_path / ".epoch_0-partial-ab12/model.safetensors").write_bytes(b"half")
    (tmp_path / ".epoch0-step4.ckpt-partial-cd34").write_bytes(b"half")
    (tmp_path / "epoch_1").mkdir()
    (tmp_path / ".epoch_1-old").mkdir()  # killed after the new epoch_1 was in place
    (tmp_path / ".epoch_2-old").mkdir()  # killed between the two renames: the old export is the only one
    (tmp_path / ".epoch_2-old/training_info.json").write_text("{}")
    (tmp_path / ".hidden").write_text("not ours")
    assert {path.name for path in remove_partial(tmp_path, "epoch_*")} == {".epoch_0-partial-ab12", ".epoch_1-old"}
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".epoch0-step4.ckpt-partial-cd34", ".hidden", "epoch_1", "epoch_2"
    ]  # fmt: skip
    assert (tmp_path / "epoch_2/training_info.json").is_file()
    assert [path.name for path in remove_partial(tmp_path, "*.ckpt")] == [".epoch0-step4.ckpt-partial-cd34"]
