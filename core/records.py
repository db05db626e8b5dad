"""Reading JSON / JSONL record files with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from core.errors import UserInputError


def read_json_records(path: Path) -> tuple[list[dict], list[str]]:
    """Records of a .jsonl (one object a line) or .json (a list of objects) file, and where each is.

    The second list names each record's place ("file:line" or "file item N") for later errors.
    """
    if not path.is_file():
        raise UserInputError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserInputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save the file as UTF-8"
        ) from None
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserInputError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UserInputError(f"{path}: expected a JSON list of objects")
        places = [f"{path} item {index}" for index in range(len(records))]
    else:
        records, places = [], []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}:{line_number}: invalid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserInputError(f"{path}:{line_number}: expected a JSON object")
            records.append(record)
            places.append(f"{path}:{line_number}")
    if not records:
        raise UserInputError(f"{path}: no records (the file is empty)")
    return records, places
