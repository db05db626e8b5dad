"""Cost of the decoding-study instruments on the embedded model, against the obvious alternative in the same run.

1. Top-k trace dump (`cli.py traces`: teacher-forced pass + top-k + JSONL lines) vs a plain teacher-forced pass
   on the same GSM8K train examples that only gathers the gold tokens' log-probabilities (target <= 1.10x).
2. Sampling with every DecodingSpec knob on (one SeededSampler filtering with all of them) vs plain sampling at
   T = 1, and plain sampling with rank logging: the per-token overhead, generation length forced equal.
Each arm is timed `--repeats` times alternately; the minimum counts.

    python benchmarks/decoding.py [--examples 16] [--questions 4] [--new-tokens 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from common import REPO, machine, timed

from commands.traces import write_traces
from core.io import write_json_atomic
from core.tensors import pad_sequences
from datamodules.batching import collate
from evaluation.decoding import DecodingSpec
from evaluation.generation import GenerationSpec, generate
from evaluation.rank_log import RankLogSpec, RankRecorder
from evaluation.teacher_forcing import teacher_forced_chunks
from models.loading import ModelSpec, load_model, load_tokenizer
from tasks.examples import TASKS, load_examples
from tasks.prompts import PromptFormatter, PromptSpec

ALL_KNOBS = DecodingSpec(
    temperature=1.0,
    top_k=50,
    top_p=0.95,
    min_p=0.02,
    prob_threshold=1e-4,
    hewitt_epsilon=1e-4,
    greedy_threshold=0.05,
    dynamic_top_k=[4, 4, 3, 3, 3, 2, 2, 2, 1, 1],
    edt_var=[0.8, 1.0, 1.0],
    cal_acc=[-0.3, 1.2, 0.01],
)


def plain_pass(model, pad_id: int, features: list[dict], batch_size: int) -> float:
    """The obvious alternative: the same teacher-forced pass, keeping only the gold tokens' log-probabilities."""
    total = 0.0
    for start in range(0, len(features), batch_size):
        batch = collate(features[start : start + batch_size], pad_id)
        scored = batch["labels"] != -100
        for chunk in teacher_forced_chunks(model, batch["input_ids"], batch["attention_mask"], scored):
            total += float(chunk.log_probs.gather(-1, chunk.targets[:, None]).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--examples", type=int, default=16, help="GSM8K train examples traced")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--questions", type=int, default=4, help="prompts sampled from (one batch)")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced generation length")
    parser.add_argument("--repeats", type=int, default=2, help="timings per arm (the minimum counts)")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/decoding.json"))
    args = parser.parse_args()

    spec = ModelSpec(name=args.model)
    model, tokenizer = load_model(spec).requires_grad_(False).eval(), load_tokenizer(spec)
    formatter = PromptFormatter(tokenizer, PromptSpec(style="plain"))
    train = load_examples(TASKS["gsm8k"], None, "train")[: args.examples]
    encoded = [formatter.encode_example(example.question, example.response) for example in train]
    features = [{"input_ids": input_ids, "labels": labels} for input_ids, labels in encoded]
    positions = sum(sum(label != -100 for label in f["labels"]) for f in features)
    pad_id = tokenizer.pad_token_id

    def dump() -> int:
        return write_traces(model, pad_id, features, io.StringIO(), args.k, args.batch_size)

    plain_pass(model, pad_id, features[:1], 1)  # warm-up
    plain_times, trace_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain_pass, model, pad_id, features, args.batch_size)[0])
        trace_times.append(timed(dump)[0])
    plain_s, trace_s = min(plain_times), min(trace_times)

    test = load_examples(TASKS["gsm8k"], None, "test")[: args.questions]
    prompts = [formatter.encode_prompt(example.question) for example in test]
    ids = pad_sequences(prompts, pad_id, "left")
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left")
    n = args.new_tokens

    def sample(decoding: DecodingSpec, ranks: bool = False) -> float:
        generation = GenerationSpec(max_new_tokens=n, min_new_tokens=n, decoding=decoding)
        recorder = RankRecorder(RankLogSpec()) if ranks else None  # samples seeded by generation.seed
        return timed(generate, model, tokenizer, ids, mask, generation, None, None, recorder)[0]

    sample(DecodingSpec(temperature=1.0))  # warm-up
    arms = {"plain": [], "all_knobs": [], "plain_with_rank_log": []}
    for _ in range(args.repeats):
        arms["plain"].append(sample(DecodingSpec(temperature=1.0)))
        arms["all_knobs"].append(sample(ALL_KNOBS))
        arms["plain_with_rank_log"].append(sample(DecodingSpec(temperature=1.0), ranks=True))
    best = {name: min(times) for name, times in arms.items()}
    tokens = len(prompts) * n
    per_token_ms = {name: 1000 * seconds / tokens for name, seconds in best.items()}

    results = {
        "model": args.model,
        "traced_examples": len(features),
        "traced_positions": positions,
        "k": args.k,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "timing": "each arm timed `repeats` times alternately, the minimum counts",
        "plain_teacher_forced_s": plain_s,
        "trace_dump_s": trace_s,
        "trace_dump_ratio": trace_s / plain_s,
        "sampled_sequences": len(prompts),
        "new_tokens": n,
        "sampling_s": best,
        "sampling_ms_per_token": per_token_ms,
        "all_knobs_overhead_ms_per_token": per_token_ms["all_knobs"] - per_token_ms["plain"],
        "all_knobs_overhead_ratio": best["all_knobs"] / best["plain"],
        "rank_log_overhead_ms_per_token": per_token_ms["plain_with_rank_log"] - per_token_ms["plain"],
        "all_knobs": {key: value for key, value in vars(ALL_KNOBS).items() if value is not None},
        "targets": {"trace_dump_ratio": "<= 1.10"},
        "machine": machine(),
    }
    print(f"\n{'arm':<34}{'wall':>10}{'ratio':>10}")
    print(f"{'plain teacher-forced pass':<34}{plain_s:>9.2f}s{1:>10.3f}")
    print(f"{'top-' + str(args.k) + ' trace dump':<34}{trace_s:>9.2f}s{trace_s / plain_s:>10.3f}")
    print(f"\n{'sampling arm':<34}{'wall':>10}{'ms/token':>10}{'ratio':>10}")
    for name, seconds in best.items():
        print(f"{name:<34}{seconds:>9.2f}s{per_token_ms[name]:>10.2f}{seconds / best['plain']:>10.3f}")
    verdict = "PASS" if results["trace_dump_ratio"] <= 1.10 else "FAIL"
    print(f"\nTrace dump vs plain pass: {results['trace_dump_ratio']:.3f}x (target <= 1.10: {verdict})")
    print(
        f"All knobs on: {results['all_knobs_overhead_ms_per_token']:+.3f} ms per token "
        f"({results['all_knobs_overhead_ratio']:.3f}x); rank log: {results['rank_log_overhead_ms_per_token']:+.3f} ms"
    )
    write_json_atomic(Path(args.output), results)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
