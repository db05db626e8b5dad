"""`training_info.json`: what an `epoch_N/` export records of the run that wrote it, read and written only here.

Keys (all optional when read: other tools write some of them): format_version, epoch, global_step, mode, backbone
(its `ModelSpec` fields, as recorded: see `models.trust`), planning (its `PlanningSpec` fields plus "tokens", the
key -> tokens layout), prompt (`PromptSpec` fields), task, base_fingerprint (`models.fingerprint`). A file without
format_version is version 1 (written before versions existed); a newer version is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from core.errors import UserInputError
from core.io import write_json_atomic
from tasks.planning import PlanningSpec

FILE_NAME = "training_info.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainingInfo:
    """The contents of a `training_info.json`."""

    global_step: int | None = None
    epoch: int | None = None
    mode: str | None = None
    backbone: dict | None = None
    planning: dict | None = None
    prompt: dict | None = None
    task: str | None = None
    base_fingerprint: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def planning_spec(self) -> PlanningSpec:
        """The planning tokens the run trained with (inactive when none are recorded)."""
        return planning_spec(self.planning)

    @property
    def has_planning_tokens(self) -> bool:
        """Whether the run added planning tokens (their rows are part of its weights)."""
        return bool((self.planning or {}).get("tokens"))

    def write(self, folder: Path) -> None:
        """Write `folder/training_info.json` atomically (unset optional keys left out)."""
        record = {key: value for key, value in asdict(self).items() if value is not None}
        write_json_atomic(Path(folder) / FILE_NAME, record)


def read_training_info(folder: str | Path) -> TrainingInfo | None:
    """The `training_info.json` of `folder`, None when it has none; an unreadable file or a version this code
    does not know is one UserInputError naming the file."""
    file = Path(folder) / FILE_NAME
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise UserInputError(f"{file}: unreadable ({error})") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{file}: expected a JSON object, found {type(record).__name__}")
    check_format_version(record.get("format_version", 1), FORMAT_VERSION, str(file))
    known = {field.name for field in fields(TrainingInfo)}
    return TrainingInfo(**{key: value for key, value in record.items() if key in known})


def check_format_version(version: object, supported: int, source: str) -> None:
    """A format version this code reads (1..supported): anything else is one UserInputError naming `source`."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= supported:
        raise UserInputError(
            f"{source}: format_version {version!r} is not one this reasoning-lab reads (1 to {supported}): "
            "written by a newer version? update reasoning-lab to load it"
        )


def planning_spec(settings: dict | PlanningSpec | None) -> PlanningSpec:
    """A `PlanningSpec` from recorded settings (a dict, with or without "tokens", or a spec object already)."""
    if settings is not None and not isinstance(settings, dict):
        return settings
    return PlanningSpec(**{key: value for key, value in (settings or {}).items() if key != "tokens"})
