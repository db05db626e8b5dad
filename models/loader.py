"""The one loader of trained models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel

from core.checkpoint_file import read_checkpoint
from core.errors import UserInputError
from models.adapters import LoraSpec, build_trainable_model, rebuild_with_adapter
from models.loading import ModelSpec, load_model, load_tokenizer
from models.vocabulary import add_tokens
from tasks.planning import PlanningSpec


def load_finetuned_model(backbone: ModelSpec, checkpoint: str | None = None) -> PreTrainedModel:
    """The model to evaluate: `backbone` itself; an `epoch_N/` export (full folder, or adapter folder on
    top of `backbone`, resized to the export's tokenizer); or a Lightning checkpoint of CausalLMFineTuner on
    `backbone` (adapters and planning-token rows merged; use the run's export for the matching tokenizer)."""
    if checkpoint is None:
        return load_model(backbone)
    path = Path(checkpoint)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            base = load_model(backbone)
            vocabulary = len(AutoTokenizer.from_pretrained(path))  # an adapter folder holds the run's tokenizer
            if base.get_input_embeddings().weight.shape[0] < vocabulary:  # planning tokens were added
                base.resize_token_embeddings(vocabulary, mean_resizing=False)
            return PeftModel.from_pretrained(base, path).merge_and_unload()
        return load_model(replace(backbone, name=str(path)))
    saved = read_checkpoint(path)
    hparams = saved.get("hyper_parameters", {})
    weights = {key.removeprefix("model."): value for key, value in saved["state_dict"].items()}
    planning = PlanningSpec(**hparams.get("planning") or {})
    if hparams.get("mode") != "full":
        lora = LoraSpec(**hparams.get("lora", {}))
        peft_model = rebuild_with_adapter(backbone, lora, weights, f"checkpoint '{path}'", hparams["mode"], planning)
        return peft_model.merge_and_unload()
    model = load_model(backbone)
    tokenizer = load_tokenizer(backbone)
    new_tokens = set(add_tokens(tokenizer, planning.tokens()))
    build_trainable_model(model, tokenizer, "full", LoraSpec(), planning, new_tokens)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise UserInputError(f"checkpoint '{path}' does not match model {backbone.name}: {error}") from None
    return model
