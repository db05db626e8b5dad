"""`generation.engine: vllm`: the vLLM engine behind the one evaluation path (`pipeline.evaluate_batch`).

The engine gets the same prompt token ids as HF's `generate` (left padding stripped), the same EOS ids, stop
strings, `min_new_tokens` and decoding rule (`vllm_processor`, over the same formulas); completions are decoded
from the generated ids and cut at the stop strings exactly as `generation.generate` does, so the rows of both
engines are built by the same code. vLLM loads a folder: the evaluated model (adapters merged on a copy) is
saved once per process to a temporary folder, removed at exit. vLLM's CPU backend spawns workers: only call
this under an `if __name__ == "__main__":` entry point (cli.py is one).
"""

from __future__ import annotations

import atexit
import copy
import gc
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.errors import UserInputError
from evaluation.generation import GenerationSpec, VllmSettings, announce_engine, cut_at_stop, eos_token_ids
from evaluation.rank_log import RankRecorder, logged_ranks
from evaluation.seeding import sample_seeds

_ENGINE: dict = {}  # the one engine of this process: model (kept alive, so its id stays unique), llm, folder


def merged_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> Path:
    """Save `model` (PEFT adapters and planning-token rows merged, on a copy) and `tokenizer` as a HF folder."""
    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        raise UserInputError("generation.engine=vllm needs unquantised weights (not a QLoRA model): use hf")
    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: VllmSettings):
    """The vLLM `LLM` serving `model` (created on first use, reused for every later batch of this process)."""
    if _ENGINE.get("model") is model and _ENGINE.get("settings") == settings:
        return _ENGINE["llm"]
    close_engine()
    try:
        from vllm import LLM
    except ImportError as error:
        raise UserInputError(f"generation.engine=vllm: vLLM does not import ({error}): use hf") from None
    from evaluation.vllm_processor import CorrectnessFirstLogitsProcessor

    folder = merged_folder(model, tokenizer, Path(tempfile.mkdtemp(prefix="reasoning-lab-vllm-")))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
    llm = LLM(
        model=str(folder),
        tokenizer=str(folder),
        trust_remote_code=False,  # our own merged folder: nothing in it needs code
        dtype=engine_dtype(model, settings),
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        logits_processors=[CorrectnessFirstLogitsProcessor],
        logprobs_mode="raw_logprobs",  # rank logs: the model's distribution, before any rule
        generation_config="vllm",  # no sampling default inherited from the model's generation_config.json
        seed=0,
    )
    _ENGINE.update(model=model, settings=settings, llm=llm, folder=folder)
    used = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    announce_engine("vllm", used, f"generation.vllm.dtype: {settings.dtype}")
    return llm


def engine_dtype(model: PreTrainedModel, settings: VllmSettings) -> str:
    """The dtype vLLM is asked for: the evaluated model's own unless `generation.vllm.dtype` names one."""
    return str(model.dtype).removeprefix("torch.") if settings.dtype == "model" else settings.dtype


def close_engine() -> None:
    """Shut the engine down and remove its temporary folder."""
    llm, folder = _ENGINE.pop("llm", None), _ENGINE.pop("folder", None)
    _ENGINE.clear()
    if llm is not None:
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
        gc.collect()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


atexit.register(close_engine)


def sampling_params(spec: GenerationSpec, eos_ids: list[int], seed: int, logprobs: bool):
    """vLLM's SamplingParams of one sequence (n = 1, its own seed), the decoding rule through the custom
    processor."""
    from vllm import SamplingParams

    from evaluation.vllm_processor import DECODING_KEY

    decoding = spec.decoding
    greedy = decoding.greedy
    return SamplingParams(
        n=1,
        temperature=0.0 if greedy else 1.0,  # the processor scales the logits itself
        seed=None if greedy else seed,
        max_tokens=spec.max_new_tokens,
        min_tokens=spec.min_new_tokens,
        stop=spec.stop or None,
        stop_token_ids=eos_ids,
        logprobs=1 if logprobs else None,
        detokenize=bool(spec.stop),  # stop strings are matched on text; completions are decoded below
        extra_args=None if greedy or decoding.is_plain else {DECODING_KEY: asdict(decoding)},
    )


def generate_vllm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    spec: GenerationSpec,
    question_ids: list[str],
    rank_recorder: RankRecorder | None = None,
) -> list[str]:
    """What `generation.generate` returns (n = repeats completions per prompt, question i's at i*n .. i*n+n-1),
    generated by vLLM: one request per sequence, seeded by `seeding.sample_seeds` as the HF engine's (vLLM
    draws its own way: equal seeds, other samples); `rank_recorder` gets its two lists per sequence."""
    from vllm.inputs import TokensPrompt

    llm = engine(model, tokenizer, spec.vllm)
    eos_ids = eos_token_ids(model, tokenizer)
    rows = zip(prompt_ids, prompt_mask, strict=True)
    prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist()) for ids, mask in rows]
    seeds = sample_seeds(spec.seed, question_ids, spec.repeats)
    params = [sampling_params(spec, eos_ids, seed, rank_recorder is not None) for seed in seeds]
    repeated = [prompt for prompt in prompts for _ in range(spec.repeats)]
    outputs = llm.generate(repeated, params, use_tqdm=False)
    sequences = [output.outputs[0] for output in outputs]
    completions = tokenizer.batch_decode([list(s.token_ids) for s in sequences], skip_special_tokens=True)
    if rank_recorder is not None:
        logs = [logged_ranks(rank_recorder.spec, rank_steps(s.token_ids, s.logprobs)) for s in sequences]
        rank_recorder.low_confidence = [low_confidence for low_confidence, _ in logs]
        rank_recorder.low_probability = [low_probability for _, low_probability in logs]
    return [cut_at_stop(text, spec.stop) for text in completions]


def rank_steps(token_ids, logprobs) -> torch.Tensor:
    """[T, 3] (rank, top-1 prob, chosen prob) of a sequence from vLLM's raw log-probabilities (top 1 + chosen)."""
    rows = []
    for token, entries in zip(token_ids, logprobs or [], strict=True):
        chosen = entries[token]
        rows.append([float(chosen.rank), math.exp(max(e.logprob for e in entries.values())), math.exp(chosen.logprob)])
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 3)
