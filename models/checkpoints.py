"""A training run's checkpoints, found and loaded for evaluation (likelihood dynamics, benchmarks).

Found in a folder: HF `checkpoint-<N>/` folders (HF Trainer, LLaMA-Factory; full or adapter), our
`epoch_<N>/` exports (step from their training_info.json) and our Lightning `*.ckpt` files (in the folder
or its `checkpoints/`), sorted by step as an integer; the base model is step 0. One checkpoint per step
(a Lightning checkpoint first, then an export or HF folder: the same weights). Something that looks like
a checkpoint but cannot be read is reported by name (`Discovery.problems`) instead of being used.

Loaded by `CheckpointModels`: adapter checkpoints (LoRA/QLoRA) are swapped into ONE loaded base model (their
weights checked and loaded by `models.trained_weights`, like every other path); anything else (full weights,
planning-token rows) is loaded by `models/loader.py`. A Lightning checkpoint is
read once for its step here and once when it is scored (memory-mapped, weights only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from peft.utils import load_peft_weights
from transformers import PreTrainedModel

from core.checkpoint_file import read_checkpoint
from core.errors import UserInputError
from models.adapters import LoraSpec
from models.checkpoint_extras import read_extras, trained_weights
from models.fingerprint import check_fingerprint
from models.loader import from_lightning_checkpoint, load_trained
from models.loading import ModelSpec, load_model
from models.modes import TrainingMode
from models.trained_weights import adapter_model, load_weights, plain_backbone
from models.training_info import FILE_NAME as INFO_FILE
from models.training_info import TrainingInfo, read_training_info
from models.trust import as_mapping, check_recorded_backbone

BASE_NAME = "base_model"
KIND_ORDER = {"lightning": 0, "export": 1, "hf": 2}
CHECKPOINT_FOLDER = re.compile(r"checkpoint-\d+|epoch_\d+")


@dataclass(frozen=True)
class Checkpoint:
    name: str
    """How outputs name it: base_model, checkpoint-555, epoch_1, epoch0-step8.ckpt."""
    step: int
    path: Path | None
    """None for the base model."""
    kind: str
    """base, hf, export or lightning."""


@dataclass
class Discovery:
    checkpoints: list[Checkpoint]
    problems: list[dict] = field(default_factory=list)
    """[{"checkpoint", "reason"}]: what looked like a checkpoint but was not used."""


def discover_checkpoints(folder: str | Path) -> Discovery:
    """The checkpoints in `folder` sorted by step (base model first, step 0)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"checkpoint folder '{folder}' does not exist")
    found, problems = [], []
    folders = [path for path in sorted(folder.iterdir()) if path.is_dir() and CHECKPOINT_FOLDER.fullmatch(path.name)]
    ckpt_files = {path.resolve(): path for path in [*folder.glob("*.ckpt"), *folder.glob("checkpoints/*.ckpt")]}
    files = sorted(ckpt_files.items(), key=lambda item: item[1].name)
    for path, name in [(path, path.name) for path in folders] + [(resolved, path.name) for resolved, path in files]:
        try:
            found.append(describe_checkpoint(path))
        except UserInputError as error:
            problems.append({"checkpoint": name, "reason": str(error)})
    if not found and not problems:
        raise UserInputError(
            f"no checkpoints in '{folder}' (looked for checkpoint-<N>/, epoch_<N>/, *.ckpt and checkpoints/*.ckpt)"
        )
    by_step: dict[int, Checkpoint] = {}
    for checkpoint in sorted(found, key=lambda c: (c.step, KIND_ORDER[c.kind], c.name)):
        by_step.setdefault(checkpoint.step, checkpoint)
    base = Checkpoint(BASE_NAME, 0, None, "base")
    return Discovery([base, *(c for step, c in sorted(by_step.items()) if step != 0)], problems)


def describe_checkpoint(path: str | Path) -> Checkpoint:
    """One checkpoint named by its path: a Lightning `.ckpt` (links named by their target), an `epoch_<N>/` export,
    an HF `checkpoint-<N>/` folder, or any other HF model or adapter folder (step from its training_info.json,
    else 0). Not a readable checkpoint: one UserInputError naming it."""
    path = Path(path)
    if path.is_file():
        resolved = path.resolve()
        return Checkpoint(resolved.name, _lightning_step(resolved), resolved, "lightning")
    if not path.is_dir():
        raise UserInputError(f"checkpoint '{path}' does not exist")
    _check_model_folder(path)
    if match := re.fullmatch(r"checkpoint-(\d+)", path.name):
        return Checkpoint(path.name, int(match.group(1)), path, "hf")
    if re.fullmatch(r"epoch_\d+", path.name):
        return Checkpoint(path.name, _export_step(path), path, "export")
    return Checkpoint(path.name, _export_step(path) if (path / INFO_FILE).is_file() else 0, path, "hf")


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise UserInputError(f"{path.name}: holds neither config.json nor adapter_config.json (incomplete?)")
    weights = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if not weights:
        raise UserInputError(f"{path.name}: holds no weights (*.safetensors / *.bin)")


def _export_step(path: Path) -> int:
    try:
        info = read_training_info(path)
    except UserInputError as error:
        raise UserInputError(f"{path.name}: no readable training_info.json with its global_step ({error})") from None
    if info is None or not isinstance(info.global_step, int):
        raise UserInputError(f"{path.name}: no readable training_info.json with its global_step")
    return info.global_step


def _lightning_step(path: Path) -> int:
    try:
        return int(read_checkpoint(path)["global_step"])
    except UserInputError as error:
        raise UserInputError(f"{path.name}: unreadable Lightning checkpoint ({error})") from None
    except (KeyError, TypeError, ValueError):
        raise UserInputError(f"{path.name}: a Lightning checkpoint without its global_step") from None


def recorded_backbone(checkpoint: Checkpoint) -> dict | None:
    """The backbone settings a checkpoint records (a Lightning checkpoint's hyper-parameters, an export's
    training_info.json), as recorded: never loaded from (see `models.trust`). None when it records none."""
    if checkpoint.kind == "lightning":
        backbone = read_checkpoint(checkpoint.path).get("hyper_parameters", {}).get("backbone")
    elif checkpoint.kind == "export":
        backbone = (read_training_info(checkpoint.path) or TrainingInfo()).backbone
    else:
        return None
    return as_mapping(backbone) if backbone is not None else None


def base_model(model: ModelSpec | None, checkpoints: list[Checkpoint]) -> ModelSpec:
    """The base model: the user's (`--model`, default the embedded model), checked against what the run's first
    checkpoint records (a request for remote code is refused, see `models.trust`). Without `--model`, a run
    recorded on another backbone is one line saying which `--model.name` to give: a file never chooses it."""
    user = model or ModelSpec()
    for checkpoint in checkpoints:
        recorded = recorded_backbone(checkpoint)
        if recorded is None:
            continue
        source = f"checkpoint '{checkpoint.path}'"
        check_recorded_backbone(recorded, user, source)
        if model is None and recorded.get("name") != user.name:
            raise UserInputError(
                f"{source} was trained on '{recorded.get('name')}': give its base model with --model.name "
                "(the base model is never taken from a file)"
            )
        break
    return user


def checkpoint_stamp(checkpoint: Checkpoint) -> list | None:
    """Size and modification time of a checkpoint's files: a checkpoint written again is scored again."""
    if checkpoint.path is None:
        return None
    files = [checkpoint.path] if checkpoint.path.is_file() else sorted(checkpoint.path.iterdir())
    return [[file.name, file.stat().st_size, file.stat().st_mtime_ns] for file in files if file.is_file()]


def reusable_record(path: Path, settings: dict, checkpoint: Checkpoint) -> dict | None:
    """A per-checkpoint result already written with the same settings from the same files, or None."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = record.get("settings") == settings and record.get("stamp") == checkpoint_stamp(checkpoint)
    return record if same else None


class CheckpointModels:
    """Models for scoring, in eval mode on `device`: the base model, adapter checkpoints swapped into it,
    or a full checkpoint loaded on its own (released after use)."""

    def __init__(self, backbone: ModelSpec, device: str | torch.device = "cpu") -> None:
        self.backbone = plain_backbone(backbone)
        self.device = torch.device(device)
        self._base: PreTrainedModel | None = None
        self._peft = None
        self._lora_key: tuple | None = None

    def _base_model(self) -> PreTrainedModel:
        if self._base is None:
            self._base = load_model(self.backbone).requires_grad_(False).to(self.device).eval()
        return self._base

    @contextmanager
    def model(self, checkpoint: Checkpoint) -> Iterator[PreTrainedModel]:
        if checkpoint.kind == "base":
            base = self._base_model()
            if self._peft is None:
                yield base
            else:
                with self._peft.disable_adapter():
                    yield self._peft
            return
        saved = read_checkpoint(checkpoint.path) if checkpoint.kind == "lightning" else None
        adapter = self._adapter_of(checkpoint, saved)
        if adapter is not None:
            yield self._swap_in(checkpoint.name, *adapter)
            return
        if saved is not None:
            model = from_lightning_checkpoint(self.backbone, saved, checkpoint.name).model
        else:
            model = load_trained(self.backbone, checkpoint.path).model
        model = model.requires_grad_(False).to(self.device)
        try:
            yield model.eval()
        finally:
            del model

    def _adapter_of(
        self, checkpoint: Checkpoint, saved: dict | None
    ) -> tuple[LoraConfig, dict, bool, str | None] | None:
        """(config, weights, weights in PEFT's saved format, recorded base fingerprint) of a LoRA checkpoint; None
        for anything the loader merges (full weights, planning-token rows). `saved`: a Lightning checkpoint's
        contents."""
        path = checkpoint.path
        if saved is not None:
            hparams = saved.get("hyper_parameters", {})
            if not TrainingMode(hparams.get("mode", "full")).lora_only:
                return None
            extras = read_extras(saved, checkpoint.name)
            weights = trained_weights(saved, checkpoint.name)
            return LoraSpec(**hparams.get("lora", {})).to_config(), weights, False, extras.base_fingerprint
        info = read_training_info(path)
        if not (path / "adapter_config.json").is_file() or (info is not None and info.has_planning_tokens):
            return None  # planning-token rows: the loader resizes the base and merges them
        config = PeftConfig.from_pretrained(str(path))
        if not isinstance(config, LoraConfig):
            raise UserInputError(f"{checkpoint.name}: a {type(config).__name__} adapter; only LoRA is supported")
        fingerprint = info.base_fingerprint if info is not None else None
        return config, load_peft_weights(str(path), device="cpu"), True, fingerprint

    def _swap_in(self, name: str, config: LoraConfig, weights: dict, peft_format: bool, fingerprint: str | None):
        """The one PEFT model, holding the adapter `weights` (a new wrapping only when the LoRA shape changes)."""
        check_fingerprint(fingerprint, self._base_model(), self.backbone.name, name)
        key = (config.r, config.lora_alpha, tuple(sorted(config.target_modules or [])), config.use_rslora)
        if self._peft is None or key != self._lora_key:
            base = self._peft.unload() if self._peft is not None else self._base_model()
            self._peft = adapter_model(base, config).to(self.device)
            self._lora_key = key
        load_weights(self._peft, weights, name, self.backbone.name, "lora", peft_format)
        return self._peft.eval()
