"""Where a run's outputs go: `SAVE_DIR/NAME/VERSION/`, the logger's folders (`version_N` unless a version is named).

The policy around that folder, in plain paths and values (the CLI passes the configured logger settings): which
names may become its folders, when a new `fit` may use an existing one (`--overwrite_run`), which run and
checkpoint `--ckpt_path last` resumes, and removing the run directory that a run stopped by bad input left empty.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.checkpoint_file import read_checkpoint
from core.errors import UserInputError
from core.io import check_inside, check_name

log = logging.getLogger(__name__)
VERSION_FOLDER = re.compile(r"version_(\d+)")
"""The logger's numbered run folders (`version_0`, `version_1`...), one per run of an experiment."""
RUN_BOOKKEEPING = ("events.out.tfevents.*", "config.yaml", "hparams.yaml")
"""What a logger writes into a run directory before any output (a run holding only these produced nothing)."""
HPC_CHECKPOINTS = "hpc_ckpt_*.ckpt"
"""Lightning's SLURM checkpoints in the trainer's root folder: a requeued job resumes from them by itself."""


def run_folder(save_dir: str | Path | None, name: str | None, version: int | str) -> Path:
    """The run directory of experiment `name` under `save_dir`: `version` as named, a number as `version_N`."""
    version = version if isinstance(version, str) else f"version_{version}"
    return Path(save_dir or ".") / str(name or "") / version


def check_run_names(name: object, version: object) -> None:
    """The experiment name and a named version become folders under the save dir: plain names only."""
    for key, value in (("name", name), ("version", version)):
        if value not in (None, "") and not isinstance(value, int):
            check_name(value, f"trainer.logger.init_args.{key}")


def is_launching_process() -> bool:
    """False in the extra processes of a multi-process run (DDP children, SLURM tasks other than rank 0)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def check_new_run(run_dir: Path, save_dir: Path, root_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """A new `fit` in `run_dir`, a version the user named: refused when it already holds a run (two runs would
    mix), unless the fit resumes (`resuming`: --ckpt_path; or a requeued SLURM job's hpc checkpoint in `root_dir`)
    or `overwrite` (--overwrite_run) starts over: then `run_dir` is removed, only inside `save_dir` and never
    the working directory. Only the launching process decides: the others start after it made the folder."""
    if not is_launching_process() or resuming or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if any(root_dir.glob(HPC_CHECKPOINTS)):
        return
    if not overwrite:
        raise UserInputError(
            f"trainer.logger.init_args.version: the run directory '{run_dir}' already holds a run; resume it with "
            "--ckpt_path last, choose another version, or start over in it with --overwrite_run true"
        )
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise UserInputError(f"--overwrite_run: '{run_dir}' holds the working directory; refusing to remove it")
    shutil.rmtree(check_inside(run_dir, save_dir, "--overwrite_run"))


def newest_run(experiment: Path) -> Path:
    """`--ckpt_path last`: the run of `experiment` (a `SAVE_DIR/NAME` folder) to resume, its highest
    `version_N` that holds a checkpoint."""
    runs = sorted(
        (int(match.group(1)), path)
        for path in experiment.glob("version_*")
        if (match := VERSION_FOLDER.fullmatch(path.name)) and checkpoint_files(path / "checkpoints")
    )
    if not runs:
        raise UserInputError(f"--ckpt_path last: no {experiment}/version_*/checkpoints/*.ckpt to resume")
    return runs[-1][1]


def checkpoint_files(folder: Path) -> list[Path]:
    """The `*.ckpt` files and links in `folder` (not the hidden staging files of a save in progress)."""
    return sorted(path for path in folder.glob("*.ckpt") if not path.name.startswith("."))


def newest_checkpoint(folder: Path) -> tuple[Path, int]:
    """The newest complete checkpoint in `folder` and its step: the readable one of the highest global step (among
    equals, the one `last.ckpt` points at, else the newest file), so neither a truncated file nor a `last.ckpt`
    left behind (beside a `last-v1.ckpt`, say) is resumed. Named `last.ckpt` when that link points at it;
    unreadable files are passed over, with a warning."""
    last = folder / "last.ckpt"
    last_target = last.resolve() if last.exists() else None
    found: dict[Path, tuple[int, bool, float]] = {}
    unreadable = []
    for path in checkpoint_files(folder):
        target = path.resolve()
        if target in found or not target.is_file():
            continue
        try:
            step = int(read_checkpoint(target).get("global_step", -1))
        except UserInputError:
            unreadable.append(path.name)
            continue
        found[target] = (step, target == last_target, target.stat().st_mtime)
    if unreadable:
        log.warning("--ckpt_path last: passed over unreadable %s", ", ".join(unreadable))
    if not found:
        raise UserInputError(
            f"--ckpt_path last: no complete checkpoint in {folder} (unreadable: {', '.join(unreadable)})"
        )
    newest = max(found, key=found.get)
    return (last if newest == last_target else newest), found[newest][0]


@contextmanager
def removed_when_unused(run_dir: Path | None, stopped_by_bad_input: Callable[[BaseException], bool]) -> Iterator[None]:
    """Run the body (a run writing into `run_dir`); when it raises an error that `stopped_by_bad_input` accepts,
    remove `run_dir` and the folders above it that the run created, if it holds only the logger's bookkeeping.
    The launching process names `run_dir`; the others pass None (nothing removed)."""
    created = missing_folders(run_dir) if run_dir is not None else []
    try:
        yield
    except Exception as error:
        if stopped_by_bad_input(error) and remove_unused_run(created):
            log.info("removed the unused run directory %s", run_dir)
        raise


def run_directory(trainer: Any) -> Path:
    """The run's log directory. Call it on EVERY rank: under DDP `trainer.log_dir` is a broadcast."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def missing_folders(run_dir: Path) -> list[Path]:
    """`run_dir` and the folders above it that do not exist yet (innermost first): what a run will create."""
    return [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]


def holds_only_bookkeeping(run_dir: Path) -> bool:
    """True when `run_dir` holds nothing but the logger's events files and config copies (no output)."""
    return all(
        entry.is_file() and any(entry.match(pattern) for pattern in RUN_BOOKKEEPING) for entry in run_dir.iterdir()
    )


def remove_unused_run(created: list[Path]) -> bool:
    """Remove the folders a failed run created (`missing_folders` before it started, innermost first) when
    the run directory holds only bookkeeping; the folders above it only when left empty. True if removed."""
    if not created or not created[0].is_dir() or not holds_only_bookkeeping(created[0]):
        return False
    shutil.rmtree(created[0])
    for folder in created[1:]:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return True
