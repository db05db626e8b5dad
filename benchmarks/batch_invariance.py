"""Greedy batch-invariance of the HF engine on the embedded model: the same GSM8K test questions generated at
`eval_batch_size` 1, 4, 8 and 16, in float32 and bfloat16; how many completions (and extracted answers) change
against batch size 1, and at which generated token they first differ.

Batches are built as `cli.py test` builds them: the datamodule's evaluation loader (prompts sorted by length,
so that batches hold similar lengths and little left padding) and `evaluate_batch`, the one evaluation path.
`--orders sorted unsorted` adds batches in the data's own order (more padding) to show what the sorting saves;
`--modes padded batch_invariant` adds `generation.batch_invariant` (each question generated on its own) and its
cost in time. Before the arms, three bitwise checks on generation's per-step logits in that dtype find the causes:
batch 1 vs batch 2 and batch 2 vs batch 4 on prompts of one length (no padding), and one token of left padding.

    nice -n 10 python benchmarks/batch_invariance.py [--questions 32] [--new-tokens 128] [--dtypes float32]
Every finished arm is added to the results file (arms of other runs kept), so dtypes can run separately.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import REPO, machine, timed
from torch.utils.data import DataLoader

from core.io import write_json_atomic
from datamodules.reasoning import ReasoningDataModule
from evaluation.generation import GenerationSpec
from evaluation.pipeline import evaluate_batch
from models.loading import ModelSpec, load_model, load_tokenizer


def batches(datamodule: ReasoningDataModule, order: str) -> DataLoader:
    """`test`'s own loader (sorted by prompt length), or the same questions in the data's order."""
    if order == "sorted":
        return datamodule.test_dataloader()
    dataset = datamodule.splits["test"]
    return DataLoader(dataset, batch_size=datamodule.hparams.eval_batch_size, collate_fn=datamodule._collate(True))


def run(model, tokenizer, args, batch_size: int, order: str, mode: str = "padded") -> dict[str, dict]:
    """Question id -> completion, prediction, left padding of its batch, new-token ids."""
    datamodule = ReasoningDataModule(tokenizer=tokenizer, test_limit=args.questions, eval_batch_size=batch_size)
    datamodule.setup("test")
    generation = GenerationSpec(max_new_tokens=args.new_tokens, batch_invariant=mode == "batch_invariant")
    found = {}
    for batch in batches(datamodule, order):
        padding = (batch["prompt_mask"].shape[1] - batch["prompt_mask"].sum(-1)) * (mode == "padded")
        for row, pad in zip(evaluate_batch(model, tokenizer, batch, generation), padding.tolist(), strict=True):
            found[row.id] = {
                "completion": row.completions[0],
                "prediction": row.prediction,
                "padding": pad,
                "tokens": tokenizer(row.completions[0], add_special_tokens=False).input_ids,
            }
    return found


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first differing token (the shorter length when one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def causes(model, tokenizer, steps: int = 48) -> dict[str, bool]:
    """Bitwise checks of `generate`'s per-step logits for the first of two GSM8K-like prompts cut to one length:
    batch 1 vs 2 and 2 vs 4 (no padding anywhere), and the same row with one token of left padding at batch 2."""
    texts = [
        "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many?",
        "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much?",
    ]
    encoded = [tokenizer(text).input_ids for text in texts]
    length = min(map(len, encoded))
    first, second = (torch.tensor([ids[:length]]) for ids in encoded)

    def logits(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return torch.stack([score[0] for score in out.scores])

    def unpadded(*rows: torch.Tensor) -> torch.Tensor:
        ids = torch.cat(rows)
        return logits(ids, torch.ones_like(ids))

    batch_1, batch_2, batch_4 = unpadded(first), unpadded(first, second), unpadded(first, second, second, second)
    pad = torch.full((1, 1), tokenizer.pad_token_id)
    padded_ids = torch.cat([torch.cat([pad, first], 1), torch.cat([second, second[:, :1]], 1)])
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[0, 0] = 0
    return {
        "batch_1_equals_batch_2": torch.equal(batch_1, batch_2),
        "batch_2_equals_batch_4": torch.equal(batch_2, batch_4),
        "one_pad_token_changes_nothing": torch.equal(logits(padded_ids, padded_mask), batch_2),
    }


def compare(reference: dict[str, dict], other: dict[str, dict]) -> dict:
    """How `other` (a batch size > 1) differs from batch size 1, question by question."""
    changed = [q for q in reference if other[q]["completion"] != reference[q]["completion"]]
    return {
        "completions_changed": len(changed),
        "predictions_changed": sum(other[q]["prediction"] != reference[q]["prediction"] for q in reference),
        "first_differing_token": sorted(first_difference(reference[q]["tokens"], other[q]["tokens"]) for q in changed),
        "changed_with_padding": sum(other[q]["padding"] > 0 for q in changed),
        "mean_padding": sum(row["padding"] for row in other.values()) / len(other),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=32, help="GSM8K test questions (test_limit's subset)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--orders", nargs="+", default=["sorted"], choices=["sorted", "unsorted"])
    parser.add_argument("--modes", nargs="+", default=["padded"], choices=["padded", "batch_invariant"])
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/batch_invariance.json"))
    args = parser.parse_args()

    header = {
        "model": args.model,
        "decoding": "greedy",
        "reference": "batch size 1 (no padding), same dtype, same questions and new tokens",
        "prompt": "the datamodule's default (chat template), GSM8K test subset of test_limit, seed 0",
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    print(f"{'dtype':<10}{'arm':<16}{'batch':>6}{'changed':>9}{'answers':>9}{'pad':>7}{'wall':>8}")
    for dtype in args.dtypes:
        spec = ModelSpec(name=args.model, dtype=dtype)
        model, tokenizer = load_model(spec).requires_grad_(False).eval(), load_tokenizer(spec)
        found_causes = causes(model, tokenizer)
        record(Path(args.output), header, f"{dtype}/causes", found_causes)
        print(f"{dtype}: {found_causes}", flush=True)
        reference_seconds, reference = timed(run, model, tokenizer, args, 1, "sorted")  # no padding
        print(f"{dtype:<10}{'-':<16}{1:>6}{'-':>9}{'-':>9}{0:>7.1f}{reference_seconds:>7.0f}s", flush=True)
        arms = [(mode, order) for mode in args.modes for order in (args.orders if mode == "padded" else ["sorted"])]
        for mode, order in arms:
            for batch_size in [b for b in args.batch_sizes if b != 1]:
                seconds, found = timed(run, model, tokenizer, args, batch_size, order, mode)
                arm = {"dtype": dtype, "order": order, "mode": mode, "batch_size": batch_size,
                       "questions": args.questions, "new_tokens": args.new_tokens, **compare(reference, found),
                       "seconds": round(seconds, 1), "reference_seconds": round(reference_seconds, 1)}  # fmt: skip
                name = order if mode == "padded" else mode
                record(Path(args.output), header, f"{dtype}/{name}/{batch_size}", arm)
                changed, answers = arm["completions_changed"], arm["predictions_changed"]
                print(f"{dtype:<10}{name:<16}{batch_size:>6}{changed:>9}{answers:>9}{arm['mean_padding']:>7.1f}"
                      f"{seconds:>7.0f}s", flush=True)  # fmt: skip
        del model
    print(f"wrote {args.output}")


def record(path: Path, header: dict, key: str, arm: dict) -> None:
    """Add one finished arm to the results file, keeping the arms already there (another dtype's run)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(header)
    results.setdefault("arms", {})[key] = arm
    write_json_atomic(path, results)


if __name__ == "__main__":
    main()
