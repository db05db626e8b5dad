"""The one loader of trained models: (backbone, checkpoint) -> model, tokenizer, planning spec, prompt.

Accepted checkpoints: none (the backbone itself); an `epoch_N/` export or HF `checkpoint-N/` folder, with
full weights or a PEFT adapter; a Lightning `.ckpt` of `cli.py fit` (full weights or adapters, with or without
planning-token rows). Each file is read once (`read_checkpoint`: weights only, memory-mapped). The tokenizer
follows one rule: a folder's own tokenizer when it has one, else the backbone's plus the run's planning
tokens (exactly what training used). Weights go in through `models.trained_weights` (one key check, one message,
and the base-weights fingerprint the run recorded). `test`/`predict` of SLOT, `dynamics`, `select` and `traces`
load through here; `fit`'s own `--ckpt_path` restore builds the same model through `models/adapters.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from peft import PeftConfig
from peft.utils import load_peft_weights
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.checkpoint_file import read_checkpoint
from core.errors import UserInputError
from models.adapters import LoraSpec, planning_tokenizer
from models.checkpoint_extras import read_extras, trained_weights
from models.fingerprint import check_fingerprint
from models.loading import ModelSpec, load_model, load_tokenizer
from models.trained_weights import adapter_model, load_weights, plain_backbone, trained_model
from models.training_info import TrainingInfo, planning_spec, read_training_info
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
        return planning_tokenizer(backbone, _checkpoint_planning(path))[0]
    return load_tokenizer(backbone)


def read_planning(checkpoint: str | Path | None) -> PlanningSpec:
    """The planning tokens a checkpoint was trained with, without loading weights (inactive for none)."""
    path = Path(checkpoint) if checkpoint else None
    if path is None or not path.exists():
        return PlanningSpec()
    if path.is_dir():
        return (read_training_info(path) or TrainingInfo()).planning_spec
    return _checkpoint_planning(path)


def _checkpoint_planning(path: Path) -> PlanningSpec:
    """The planning settings a Lightning checkpoint's hyper-parameters record."""
    return planning_spec(read_checkpoint(path).get("hyper_parameters", {}).get("planning"))


def from_lightning_checkpoint(backbone: ModelSpec, saved: dict, source: str) -> TrainedModel:
    """A model from the contents of a `cli.py fit` checkpoint (already read), adapters merged."""
    weights, extras = trained_weights(saved, source), read_extras(saved, source)
    hparams = saved.get("hyper_parameters", {})
    check_recorded_backbone(hparams.get("backbone"), backbone, source)
    planning = planning_spec(hparams.get("planning"))
    if extras.planning_tokens is not None and extras.planning_tokens != planning.key_tokens():
        raise UserInputError(f"{source}: its planning tokens {sorted(extras.planning_tokens)} differ from its settings")
    lora = LoraSpec(**(hparams.get("lora") or {}))
    mode = hparams.get("mode", "full")
    model = trained_model(backbone, mode, lora, planning, weights, source, extras.base_fingerprint)
    tokenizer, _ = planning_tokenizer(backbone, planning)
    data = saved.get("datamodule_hyper_parameters", {})
    prompt = data.get("prompt")
    prompt = vars(prompt) if prompt is not None and not isinstance(prompt, dict) else prompt
    return TrainedModel(model, tokenizer, planning, prompt, data.get("task"), int(saved.get("global_step", 0)))


def _from_folder(backbone: ModelSpec, path: Path) -> TrainedModel:
    source = f"checkpoint '{path}'"
    info = read_training_info(path) or TrainingInfo()
    check_recorded_backbone(info.backbone, backbone, source)
    planning = info.planning_spec
    tokenizer = _folder_tokenizer(path, backbone) if _has_tokenizer(path) else planning_tokenizer(backbone, planning)[0]
    if (path / "adapter_config.json").is_file():
        model = _merged_adapter_folder(backbone, path, info, len(tokenizer), source)
    elif (path / "config.json").is_file():
        model = load_model(replace(backbone, name=str(path)))
    else:
        raise UserInputError(f"{source} holds neither config.json nor adapter_config.json")
    check_vocabulary(model, tokenizer, source)
    return TrainedModel(model, tokenizer, planning, info.prompt, info.task, info.global_step or 0)


def _merged_adapter_folder(
    backbone: ModelSpec, path: Path, info: TrainingInfo, vocabulary: int, source: str
) -> PreTrainedModel:
    """The unquantised backbone (grown to `vocabulary` rows for the run's planning tokens) with the PEFT adapter
    saved in `path` merged."""
    base = load_model(plain_backbone(backbone))
    check_fingerprint(info.base_fingerprint, base, backbone.name, source)
    if base.get_input_embeddings().weight.shape[0] < vocabulary:  # the run added planning tokens
        base.resize_token_embeddings(vocabulary, mean_resizing=False)
    config = PeftConfig.from_pretrained(str(path))
    model = adapter_model(base, config)
    mode = info.mode or str(config.peft_type.value).lower()
    load_weights(model, load_peft_weights(str(path), device="cpu"), source, backbone.name, mode, peft_format=True)
    return model.merge_and_unload()


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """A tokenizer with ids beyond the model's embedding rows would index out of range: one clear error."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserInputError(f"{source}: its tokenizer has {len(tokenizer)} tokens but the model only {rows} rows")


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
