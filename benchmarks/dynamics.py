"""Likelihood dynamics over checkpoints: the `dynamics` command vs the upstream way, on the same pool and checkpoints.

Upstream way (SLM_REASONING's calculate_llh): per checkpoint a fresh model load (adapter merged), then one
sample at a time, logits over every position (prompt included) and a full [length, vocab] fp32 log_softmax.
Ours: `commands.dynamics.dynamics` end to end: one base model with the LoRA checkpoints swapped in, length-sorted
batches, the output head only on scored positions, at most --chunk-tokens positions at a time.

1. Same numbers: max |difference| of per-sample log-likelihood (summed over ~100 tokens, and per token),
   perplexity (relative) and entropy (target 1e-4).
2. Time: all-checkpoints wall time, upstream / ours (target >= 1.0 on CPU), per batch size.
3. Memory: the largest fp32 [positions, vocab] tensor each way (ours is bounded by --chunk-tokens).
4. Live callback (--fit-steps > 0): a short LoRA fit scoring the pool every --fit-steps/2 steps; the cost is the
   scoring time per checkpoint as a fraction of the training time between checkpoints.

    python benchmarks/dynamics.py [--checkpoints 3] [--samples 6] [--batch-sizes 1 8] [--fit-steps 4]
    python benchmarks/dynamics.py --device cuda --random-1b --batch-sizes 1 16   # GPU: a random ~1B Llama
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from common import REPO, machine, timed
from peft import LoraConfig, PeftModel, get_peft_model

from commands.dynamics import dynamics
from core.io import write_json_atomic
from evaluation.likelihood import ScoringSpec, encode, load_pool
from models.loading import ModelSpec, load_model, load_tokenizer
from tasks.prompts import PromptFormatter

POOL = REPO / "data/dynamics/pool.json"


def random_1b(folder: Path, tokenizer) -> Path:
    """A random-weight ~1.1B Llama (TinyLlama's shape) with the embedded model's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def make_run(folder: Path, spec: ModelSpec, checkpoints: int, every: int) -> list[tuple[int, Path | None]]:
    """HF-Trainer-style LoRA checkpoints checkpoint-<N>/ (random non-zero adapters, distinct seeds)."""
    base = load_model(spec)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=modules)
    peft_model, steps = get_peft_model(base, config), [(0, None)]
    for index in range(1, checkpoints + 1):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
        path = folder / f"checkpoint-{index * every}"
        peft_model.save_pretrained(path)
        steps.append((index * every, path))
    return steps


def upstream(spec: ModelSpec, steps, samples, scoring: ScoringSpec, device: str) -> list[list[dict]]:
    """One sample at a time, logits over every position, a fresh model load per checkpoint."""
    results = []
    tokenizer = load_tokenizer(spec)
    formatter = PromptFormatter(tokenizer, scoring.prompt)
    sequences = [encode(formatter, s.question, s.output, scoring.score) for s in samples]
    for _, path in steps:
        model = load_model(spec)
        if path is not None:
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        model = model.to(device).eval()
        rows = []
        with torch.no_grad():
            for ids, first in sequences:
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0]
                log_probs = torch.log_softmax(logits.float(), dim=-1)[first - 1 : -1]
                token = log_probs.gather(-1, torch.tensor(ids[first:], device=device)[:, None])[:, 0]
                entropy = -(log_probs.exp() * log_probs).sum(-1)
                total = float(token.double().sum())
                rows.append({"log_likelihood": total, "perplexity": math.exp(-total / len(token)),
                             "entropy": float(entropy.double().mean()), "token_count": len(token)})  # fmt: skip
        results.append(rows)
        del model
    return results


def max_differences(reference: list[list[dict]], output: Path, names: list[str]) -> dict[str, float]:
    worst = {"log_likelihood": 0.0, "log_likelihood_per_token": 0.0, "perplexity_relative": 0.0, "entropy": 0.0,
             "token_count": 0.0}  # fmt: skip
    for rows, name in zip(reference, names, strict=True):
        record = json.loads((output / "checkpoints" / f"{name}.json").read_text())
        for want, got in zip(rows, [r["metrics"] for r in record["results"]], strict=True):
            difference = abs(want["log_likelihood"] - got["log_likelihood"])
            worst["log_likelihood"] = max(worst["log_likelihood"], difference)
            per_token = difference / want["token_count"]
            worst["log_likelihood_per_token"] = max(worst["log_likelihood_per_token"], per_token)
            relative = abs(want["perplexity"] - got["perplexity"]) / want["perplexity"]
            worst["perplexity_relative"] = max(worst["perplexity_relative"], relative)
            worst["entropy"] = max(worst["entropy"], abs(want["entropy"] - got["entropy"]))
            worst["token_count"] = max(worst["token_count"], abs(want["token_count"] - got["token_count"]))
    return worst


def live_callback_cost(model_name: str, pool: Path, steps: int, save_dir: Path) -> dict:
    """A short LoRA fit (planning config, CPU preset) with the callback scoring every steps/2 steps."""
    from cli import main

    every = max(1, steps // 2)
    init_args = {"pool": str(pool), "every_n_steps": every, "on_checkpoint": False}
    callback = json.dumps({"class_path": "callbacks.dynamics.LikelihoodDynamics", "init_args": init_args})
    main(["fit", "--config", str(REPO / "configs/planning_gsm8k.yaml"),
          "--config", str(REPO / "configs/presets/cpu_demo.yaml"), "--model.init_args.backbone.name", model_name,
          "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--export.enabled", "false",
          "--data.val_size", "1", "--data.max_length", "256", f"--trainer.callbacks+={callback}",
          "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    summary = json.loads(next(save_dir.glob("*/version_0/dynamics/summary.json")).read_text())
    records = [json.loads(p.read_text()) for p in save_dir.glob("*/version_0/dynamics/checkpoints/*.json")]
    trained = [r for r in records if r["step"] > 0]
    scoring = sum(r["seconds"] for r in trained) / len(trained)
    training = sum(r["train_seconds"] for r in trained) / len(trained)
    return {"every_n_steps": every, "steps": summary["steps"], "scoring_seconds": scoring,
            "training_seconds_between": training, "fraction": scoring / training}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-1b", action="store_true", help="a random-weight ~1.1B Llama instead of --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoints", type=int, default=3, help="LoRA checkpoints besides the base model")
    parser.add_argument("--samples", type=int, default=4, help="pool samples (the bundled GSM8K pool, in order)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--fit-steps", type=int, default=2, help="0 skips the live-callback measurement")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/dynamics.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dynamics-bench-"))
    spec = ModelSpec(name=args.model)
    if args.random_1b:
        spec = ModelSpec(name=str(random_1b(work / "random-1b", load_tokenizer(spec))))
    pool = load_pool(POOL)[: args.samples]
    pool_path = work / "pool.json"
    pool_path.write_text(json.dumps([asdict(sample) for sample in pool]))
    steps = make_run(work / "run", spec, args.checkpoints, every=50)
    names = ["base_model", *(path.name for _, path in steps[1:])]
    scoring = ScoringSpec(chunk_tokens=args.chunk_tokens)

    upstream_seconds, reference = timed(upstream, spec, steps, pool, scoring, args.device)
    tokenizer, rows = load_tokenizer(spec), []
    vocab, formatter = len(tokenizer), PromptFormatter(tokenizer, scoring.prompt)
    encoded = [encode(formatter, s.question, s.output, "response") for s in pool]
    lengths = [len(ids) for ids, _ in encoded]
    scored = sorted((len(ids) - first for ids, first in encoded), reverse=True)
    for batch_size in args.batch_sizes:
        output = work / f"out-b{batch_size}"
        batched = ScoringSpec(batch_size=batch_size, chunk_tokens=args.chunk_tokens)
        seconds, _ = timed(dynamics, str(work / "run"), str(pool_path), model=spec, scoring=batched,
                           output=str(output), device=args.device)  # fmt: skip
        largest = min(args.chunk_tokens, sum(scored[:batch_size])) * vocab * 4 / 2**20  # scored positions x vocab
        rows.append({"batch_size": batch_size, "seconds": seconds, "speedup": upstream_seconds / seconds,
                     "largest_fp32_logits_mb": largest,
                     "max_differences": max_differences(reference, output, names)})  # fmt: skip

    result = {
        "machine": machine() | {"device": args.device},
        "model": spec.name, "checkpoints": len(steps), "samples": len(pool), "chunk_tokens": args.chunk_tokens,
        "upstream_seconds": upstream_seconds, "ours": rows,
        "upstream_largest_fp32_logits_mb": max(lengths) * vocab * 4 / 2**20,  # every position x vocab
    }  # fmt: skip
    if args.fit_steps:
        result["live_callback"] = live_callback_cost(spec.name, pool_path, args.fit_steps, work / "fit")

    print(
        f"\n{len(steps)} checkpoints (base + {len(steps) - 1} LoRA) x {len(pool)} samples, {spec.name}, {args.device}"
    )
    print(f"{'way':<24}{'seconds':>10}{'upstream/ours':>15}{'logits MB':>11}{'|dLL|/token':>12}{'max rel dPPL':>14}"
          f"{'max |dH|':>11}")  # fmt: skip
    upstream_mb = result["upstream_largest_fp32_logits_mb"]
    print(f"{'upstream (per sample)':<24}{upstream_seconds:>10.1f}{1.0:>15.2f}{upstream_mb:>11.0f}")
    for row in rows:
        d = row["max_differences"]
        print(f"{'ours, batch ' + str(row['batch_size']):<24}{row['seconds']:>10.1f}{row['speedup']:>15.2f}"
              f"{row['largest_fp32_logits_mb']:>11.0f}{d['log_likelihood_per_token']:>12.2e}"
              f"{d['perplexity_relative']:>14.2e}{d['entropy']:>11.2e}")  # fmt: skip
    if "live_callback" in result:
        live = result["live_callback"]
        print(f"live callback: {live['scoring_seconds']:.1f} s per scoring / "
              f"{live['training_seconds_between']:.1f} s of training between = {100 * live['fraction']:.0f} % "
              f"(every {live['every_n_steps']} steps)")  # fmt: skip
    write_json_atomic(Path(args.output), result)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
