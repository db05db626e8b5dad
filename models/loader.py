"""The one loader of trained models: (backbone, checkpoint) -> model, tokenizer, planning spec, prompt.

Accepted checkpoints: none (the backbone itself); an `epoch_N/` export or HF `checkpoint-N/` folder, with
full weights or a PEFT adapter; a Lightning `.ckpt` of `cli.py fit` (full weights or adapters, with or without
planning-token rows). Each file is read once (`read_checkpoint`: weights only, memory-mapped). The tokenizer
follows one rule: a folder's own tokenizer when it has one, else the backbone's plus the run's planning
tokens (exactly what training used). Exports, `test`/`predict` of SLOT, `dynamics`, `select` and `traces` load
through here; `fit`'s own `--ckpt_path` restore builds the same model through `models/adapters.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.checkpoint_file import read_checkpoint
from core.errors import UserInputError
from models.adapters import LoraSpec, build_trainable_model, planning_tokenizer, rebuild_with_adapter
from models.loading import ModelSpec, load_model, load_tokenizer
from models.trust import check_recorded_backbone, refuse_custom_code
from tasks.planning import PlanningSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class TrainedModel:
    """What evaluation needs of a trained model."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    planning: PlanningSpec
    """The planning tokens it was trained with (inactive for plain models)."""
    prompt: dict | None = None
    """The `PromptSpec` fields it was trained with, where the checkpoint records them."""
    task: str | None = None
    step: int = 0
    """The training step of the checkpoint (0 for the backbone)."""


def load_trained(backbone: ModelSpec, checkpoint: str | Path | None = None) -> TrainedModel:
    """Load `checkpoint` (None = `backbone` itself) for evaluation, in eval mode."""
    if checkpoint is None:
        return TrainedModel(load_model(backbone).eval(), load_tokenizer(backbone), PlanningSpec())
    path = Path(checkpoint)
    if path.is_dir():
        trained = _from_folder(backbone, path)
    elif path.is_file():
        trained = from_lightning_checkpoint(backbone, read_checkpoint(path), f"checkpoint '{path}'")
    else:
        raise UserInputError(f"checkpoint '{path}' does not exist")
    trained.model.eval()
    return trained


def read_tokenizer(backbone: ModelSpec, checkpoint: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load_trained` would give, without loading weights (a folder's own, or the backbone's
    plus the planning tokens recorded in a Lightning checkpoint)."""
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and path.is_dir() and _has_tokenizer(path):
        return _folder_tokenizer(path, backbone)
    if path is not None and path.is_file():
        return planning_tokenizer(backbone, _planning_of(read_checkpoint(path).get("hyper_parameters", {})))[0]
    return load_tokenizer(backbone)


def read_planning(checkpoint: str | Path | None) -> PlanningSpec:
    """The planning tokens a checkpoint was trained with, without loading weights (inactive for none)."""
    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.exists():
        return PlanningSpec()
    if path.is_dir():
        return _planning_of(_training_info(path))
    return _planning_of(read_checkpoint(path).get("hyper_parameters", {}))


def from_lightning_checkpoint(backbone: ModelSpec, saved: dict, source: str) -> TrainedModel:
    """A model from the contents of a `cli.py fit` checkpoint (already read), adapters merged."""
    hparams = saved.get("hyper_parameters", {})
    if "state_dict" not in saved:
        raise UserInputError(f"{source}: not a Lightning checkpoint of cli.py fit (no state_dict)")
    check_recorded_backbone(hparams.get("backbone"), backbone, source)
    planning = _planning_of(hparams)
    saved_tokens = saved.get("planning_tokens")
    if saved_tokens is not None and saved_tokens != planning.key_tokens():
        raise UserInputError(f"{source}: its planning tokens {sorted(saved_tokens)} differ from its settings")
    weights = {key.removeprefix("model."): value for key, value in saved["state_dict"].items()}
    lora = LoraSpec(**(hparams.get("lora") or {}))
    model = model_from_training_state(backbone, hparams.get("mode", "full"), lora, planning, weights, source)
    tokenizer, _ = planning_tokenizer(backbone, planning)
    data = saved.get("datamodule_hyper_parameters", {})
    prompt = data.get("prompt")
    prompt = vars(prompt) if prompt is not None and not isinstance(prompt, dict) else prompt
    return TrainedModel(model, tokenizer, planning, prompt, data.get("task"), int(saved.get("global_step", 0)))


def model_from_training_state(
    backbone: ModelSpec, mode: str, lora: LoraSpec, planning: PlanningSpec, weights: dict, source: str
) -> PreTrainedModel:
    """The plain HF model trained in `mode` whose trainable weights (keys as in the training model, without the
    LightningModule's `model.` prefix) are `weights`: adapters and planning-token rows merged. Lightning
    checkpoints and the epoch exports both come through here."""
    if mode != "full":
        return rebuild_with_adapter(backbone, lora, weights, source, mode, planning).merge_and_unload()
    tokenizer, new_tokens = planning_tokenizer(backbone, planning)
    model = load_model(replace(backbone, quantization=None, gradient_checkpointing=False))
    build_trainable_model(model, tokenizer, "full", lora, planning, set(new_tokens))
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise UserInputError(f"{source} does not match model {backbone.name}: {_first_line(error)}") from None
    return model


def _from_folder(backbone: ModelSpec, path: Path) -> TrainedModel:
    info = _training_info(path)
    check_recorded_backbone(info.get("backbone"), backbone, f"checkpoint '{path}'")
    planning = _planning_of(info)
    tokenizer = _folder_tokenizer(path, backbone) if _has_tokenizer(path) else planning_tokenizer(backbone, planning)[0]
    if (path / "adapter_config.json").is_file():
        base = load_model(replace(backbone, quantization=None, gradient_checkpointing=False))
        if base.get_input_embeddings().weight.shape[0] < len(tokenizer):  # the run added planning tokens
            base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
        except RuntimeError as error:  # shapes differ: another backbone
            message = f"adapter '{path}' does not match model {backbone.name}: {_first_line(error)}"
            raise UserInputError(message) from None
    elif (path / "config.json").is_file():
        model = load_model(replace(backbone, name=str(path)))
    else:
        raise UserInputError(f"checkpoint '{path}' holds neither config.json nor adapter_config.json")
    check_vocabulary(model, tokenizer, f"checkpoint '{path}'")
    return TrainedModel(model, tokenizer, planning, info.get("prompt"), info.get("task"), info.get("global_step", 0))


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """A tokenizer with ids beyond the model's embedding rows would index out of range: one clear error."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserInputError(f"{source}: its tokenizer has {len(tokenizer)} tokens but the model only {rows} rows")


def _training_info(path: Path) -> dict:
    file = path / "training_info.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise UserInputError(f"{file}: unreadable ({error})") from None


def _planning_of(settings: dict) -> PlanningSpec:
    planning = settings.get("planning") or {}
    if not isinstance(planning, dict):  # a PlanningSpec object
        return planning
    return PlanningSpec(**{key: value for key, value in planning.items() if key != "tokens"})


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _folder_tokenizer(path: Path, backbone: ModelSpec) -> PreTrainedTokenizerBase:
    try:  # trust_remote_code is always explicit: transformers would otherwise ask on stdin
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=backbone.trust_remote_code)
    except ValueError as error:
        raise refuse_custom_code(error, str(path)) or error from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
