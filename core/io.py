"""Atomic writes (a file, a folder or a set of files appears complete or not at all) and the checks on names and
paths that become output folders."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.errors import UserInputError

# What a run directory holds before it has produced anything: the logger's events file and the config copies.

PARTIAL = "-partial-"
"""Marks the hidden staging file or folder `.{name}-partial-XXXX` that an atomic write fills before the rename."""
RETIRED = "-old"
"""`.{name}-old`: the previous `name` while `atomic_directory` swaps the new one in."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_folder(path: str | Path, what: str) -> None:
    """Refuse (one line naming `what`) an output folder that cannot be made because it, or a folder above it,
    is a file. Nothing is created."""
    path = Path(path)
    for ancestor in (path, *path.parents):
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == path else f"is under '{ancestor}', a file"
                raise UserInputError(f"{what}: the output folder '{path}' {where}; choose another folder")
            return


def check_name(value: object, what: str) -> str:
    """`value` as one path component (an experiment, version, run or arm name): refused in one line naming `what`
    when it is empty, `.` or `..`, or holds a path separator or a control character. Returns it as text."""
    name = str(value)
    if name in ("", ".", "..") or any(char in name for char in "/\\") or not name.isprintable():
        raise UserInputError(
            f"{what}: {name!r} is not a plain name (no '/', '\\', '.', '..' or control characters); it becomes a "
            "folder or file name"
        )
    return name


def check_inside(path: Path, root: Path, what: str) -> Path:
    """`path`, resolved; refused in one line naming `what` unless it lies strictly inside `root` (resolved, links
    followed): nothing is written or removed outside the folder it belongs to."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise UserInputError(f"{what}: '{path}' is not inside '{root}'; refusing to write or remove it")
    return resolved


def make_folder(path: Path) -> None:
    """`mkdir -p path`, with one clear error when a file is in the way."""
    check_output_folder(path, "output")
    path.mkdir(parents=True, exist_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    make_folder(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are shared as usual
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_file_set(folder: Path, files: dict[str, str | bytes], stale: Iterable[str] = ()) -> list[str]:
    """Write `files` (name -> text or bytes) into `folder` as one set: every file is first written in full to a
    temporary file beside its target; only when all of them are written are they renamed into place, and then
    the names in `stale` (outputs of an earlier run that this one does not produce) are removed. A failure
    while writing leaves `folder` as it was: the previous set, whole, or nothing. Returns the stale names that
    were removed."""
    make_folder(folder)
    staged: list[tuple[str, Path]] = []
    try:
        for name, content in files.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
            staged.append((name, Path(temporary)))
            with os.fdopen(handle, "wb") as file:
                file.write(content.encode("utf-8") if isinstance(content, str) else content)
            os.chmod(temporary, 0o666 & ~_umask())
        for name, temporary in staged:
            os.replace(temporary, folder / name)
    finally:
        for _, temporary in staged:
            temporary.unlink(missing_ok=True)
    removed = [name for name in stale if name not in files and (folder / name).is_file()]
    for name in removed:
        (folder / name).unlink()
    return removed


def write_json_atomic(path: Path, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces `path` (an older `path` is removed only then)."""
    make_folder(path.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
        if path.exists():
            retired = path.with_name(f".{path.name}{RETIRED}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(path, retired)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remove_partial(folder: Path, names: str = "*") -> list[Path]:
    """Remove what atomic writes of `names` (a glob) left in `folder` when a process was killed mid-write: staging
    files and folders (`.{name}-partial-*`), which never became outputs. A retired `.{name}-old` folder is
    removed when `name` exists again, and renamed back to `name` when the kill came between the two renames.
    Returns the paths removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.glob(f".{names}{PARTIAL}*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    for retired in sorted(folder.glob(f".{names}{RETIRED}")):
        original = retired.with_name(retired.name[1 : -len(RETIRED)])
        if original.exists() or original.is_symlink():
            shutil.rmtree(retired, ignore_errors=True)
            removed.append(retired)
        else:
            os.replace(retired, original)
    return removed


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path` to stream into; on success it becomes `path` (atomic rename)."""
    make_folder(path.parent)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}{PARTIAL}", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def figure_png(figure: Any, dpi: int = 120) -> bytes:
    """A matplotlib figure rendered as PNG bytes (for `write_file_set`), the figure closed afterwards."""
    import matplotlib.pyplot as plt

    png = io.BytesIO()
    try:
        figure.savefig(png, format="png", dpi=dpi)
    finally:
        plt.close(figure)
    return png.getvalue()
