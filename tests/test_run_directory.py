"""core/run_directory.py: where a run's outputs go and when an existing run directory may be used or removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import UserInputError
from core.run_directory import (
    check_new_run,
    check_run_names,
    checkpoint_files,
    newest_run,
    removed_when_unused,
    run_folder,
)


@pytest.fixture(autouse=True)
def launching_process(monkeypatch):
    """The process that launched the run (not a DDP child or a later SLURM task)."""
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)


def a_run(folder: Path) -> Path:
    """`folder` holding a finished run's output."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints/last.ckpt").write_bytes(b"weights")
    return folder


def test_run_folders_are_save_dir_name_version():
    assert run_folder("runs", "exp", 3) == Path("runs/exp/version_3")
    assert run_folder("runs", None, "train") == Path("runs/train")
    assert run_folder(None, "", 0) == Path("version_0")


@pytest.mark.parametrize(("name", "version"), [("a/b", None), ("exp", ".."), ("exp", "x\ny")])
def test_names_that_are_not_plain_folder_names_are_refused(name, version):
    field = "name" if name != "exp" else "version"
    with pytest.raises(UserInputError, match=f"^trainer.logger.init_args.{field}: .* is not a plain name"):
        check_run_names(name, version)


def test_plain_names_and_numbered_versions_pass():
    check_run_names("exp", 3)
    check_run_names(None, "train")
    check_run_names("", None)


def test_a_new_fit_in_a_run_directory_holding_a_run_is_refused(tmp_path):
    run = a_run(tmp_path / "runs/exp/v1")
    with pytest.raises(UserInputError) as refused:
        check_new_run(run, tmp_path / "runs", tmp_path, resuming=False, overwrite=False)
    assert str(refused.value) == (
        f"trainer.logger.init_args.version: the run directory '{run}' already holds a run; resume it with "
        "--ckpt_path last, choose another version, or start over in it with --overwrite_run true"
    )
    assert (run / "checkpoints/last.ckpt").is_file()


def test_an_empty_or_missing_run_directory_is_used_as_it_is(tmp_path):
    (tmp_path / "runs/exp/empty").mkdir(parents=True)
    check_new_run(tmp_path / "runs/exp/empty", tmp_path / "runs", tmp_path, resuming=False, overwrite=False)
    check_new_run(tmp_path / "runs/exp/missing", tmp_path / "runs", tmp_path, resuming=False, overwrite=False)
    assert (tmp_path / "runs/exp/empty").is_dir() and not (tmp_path / "runs/exp/missing").exists()


def test_a_resumed_run_is_kept(tmp_path):
    run = a_run(tmp_path / "runs/exp/v1")
    check_new_run(run, tmp_path / "runs", tmp_path, resuming=True, overwrite=True)
    assert (run / "checkpoints/last.ckpt").is_file()


def test_a_requeued_slurm_job_resumes_from_its_hpc_checkpoint(tmp_path):
    run = a_run(tmp_path / "runs/exp/v1")
    (tmp_path / "root").mkdir()
    (tmp_path / "root/hpc_ckpt_1.ckpt").write_bytes(b"state")
    check_new_run(run, tmp_path / "runs", tmp_path / "root", resuming=False, overwrite=False)
    assert (run / "checkpoints/last.ckpt").is_file()


def test_overwrite_removes_the_run_directory_only(tmp_path):
    run = a_run(tmp_path / "runs/exp/v1")
    other = a_run(tmp_path / "runs/exp/v2")
    check_new_run(run, tmp_path / "runs", tmp_path, resuming=False, overwrite=True)
    assert not run.exists() and (other / "checkpoints/last.ckpt").is_file()


def test_overwrite_never_removes_the_working_directory(tmp_path, monkeypatch):
    run = a_run(tmp_path / "runs/exp/v1")
    monkeypatch.chdir(run / "checkpoints")
    with pytest.raises(UserInputError, match="holds the working directory; refusing to remove it"):
        check_new_run(run, tmp_path / "runs", tmp_path, resuming=False, overwrite=True)
    assert (run / "checkpoints/last.ckpt").is_file()


def test_overwrite_never_removes_outside_the_save_dir(tmp_path):
    outside = a_run(tmp_path / "elsewhere")
    (tmp_path / "runs/exp").mkdir(parents=True)
    (tmp_path / "runs/exp/v1").symlink_to(outside)
    with pytest.raises(UserInputError, match="^--overwrite_run: .* is not inside"):
        check_new_run(tmp_path / "runs/exp/v1", tmp_path / "runs", tmp_path, resuming=False, overwrite=True)
    assert (outside / "checkpoints/last.ckpt").is_file()


def test_only_the_launching_process_decides(tmp_path, monkeypatch):
    run = a_run(tmp_path / "runs/exp/v1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    check_new_run(run, tmp_path / "runs", tmp_path, resuming=False, overwrite=True)
    check_new_run(run, tmp_path / "runs", tmp_path, resuming=False, overwrite=False)
    assert (run / "checkpoints/last.ckpt").is_file()


def test_the_run_to_resume_is_the_highest_numbered_version_with_a_checkpoint(tmp_path):
    for version in ("version_2", "version_10", "version_x"):
        a_run(tmp_path / version)
    (tmp_path / "version_11/checkpoints").mkdir(parents=True)  # no checkpoint yet
    assert newest_run(tmp_path) == tmp_path / "version_10"


def test_no_run_to_resume_is_one_line(tmp_path):
    (tmp_path / "version_0/checkpoints").mkdir(parents=True)
    (tmp_path / "version_0/checkpoints/.last.ckpt-partial-x").write_bytes(b"")  # a save in progress
    with pytest.raises(UserInputError) as refused:
        newest_run(tmp_path)
    assert str(refused.value) == f"--ckpt_path last: no {tmp_path}/version_*/checkpoints/*.ckpt to resume"


def test_checkpoint_files_skip_the_staging_files_of_a_save(tmp_path):
    for name in ("epoch=1.ckpt", "last.ckpt", ".epoch=2.ckpt-partial-abc", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert checkpoint_files(tmp_path) == [tmp_path / "epoch=1.ckpt", tmp_path / "last.ckpt"]


def bad_input(error: BaseException) -> bool:
    return isinstance(error, UserInputError)


def test_a_run_stopped_by_bad_input_leaves_no_folder_it_created(tmp_path):
    run = tmp_path / "runs/exp/version_0"
    with pytest.raises(UserInputError), removed_when_unused(run, bad_input):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("{}")
        raise UserInputError("data.path: no such file")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("a bug"), None], ids=["other error", "output written"])
def test_a_run_with_output_or_stopped_by_another_error_is_kept(tmp_path, error):
    run = tmp_path / "runs/exp/version_0"
    with pytest.raises((RuntimeError, UserInputError)), removed_when_unused(run, bad_input):
        run.mkdir(parents=True)
        if error is None:
            (run / "samples.jsonl").write_text("{}\n")
            error = UserInputError("later bad input")
        raise error
    assert run.is_dir()


def test_folders_that_existed_before_the_run_are_kept(tmp_path):
    (tmp_path / "runs").mkdir()
    run = tmp_path / "runs/exp/version_0"
    with pytest.raises(UserInputError), removed_when_unused(run, bad_input):
        run.mkdir(parents=True)
        raise UserInputError("bad")
    assert os.listdir(tmp_path / "runs") == []
