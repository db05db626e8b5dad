"""What README command 1 teaches the model, arm by arm: the controlled experiment behind the planning-token
defaults of `configs/presets/cpu_demo.yaml` and the comparison with the plain chain-of-thought LoRA baseline at
the same budget.

Every arm is `cli.py fit --config configs/planning_gsm8k.yaml --config configs/presets/cpu_demo.yaml` plus its
overrides: same seed, same 128 training examples, same steps, same 8 validation questions, greedy decoding.
Per arm: validation loss before and after training, the share of validation completions that follow the layout
(planning runs: planning tokens, step text, answer line; the CoT baseline: step text then the answer line), the
longest run of one token repeated in a completion, accuracy, and the wall time.

    python benchmarks/planning_demo.py [--arms paper spread ...] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from itertools import groupby
from pathlib import Path

from common import REPO, machine, timed
from transformers import AutoTokenizer

from core.checkpoint_file import read_checkpoint
from core.io import write_json_atomic
from models.loader import read_tokenizer
from models.loading import ModelSpec

PLANNING = "--model.init_args.planning."
LR = "--model.init_args.optimizer.init_args.lr"
# The paper's settings on top of the preset: LoRA 2e-4, 3 prefix + 2 type tokens, token rows at the same rate.
PAPER = [LR, "2e-4", PLANNING + "n_prefix", "3", PLANNING + "n_special", "2", PLANNING + "token_lr", "2e-4"]
ONE_TOKEN_PER_KEY = [PLANNING + "n_prefix", "1", PLANNING + "n_special", "1"]
UNTIED = [PLANNING + "untie_output", "true"]
LORA_COT = ["--config", "configs/planning_modes/lora_cot.yaml"]
# Arm -> overrides of command 1 ("default": configs/planning_gsm8k.yaml + configs/presets/cpu_demo.yaml as they are:
# LoRA 1e-3, one token per key, token rows 2e-3, tied).
ARMS = {
    "paper": PAPER,
    "spread": [*PAPER, PLANNING + "init_spread", "0.1"],
    "token_lr": [*PAPER, PLANNING + "token_lr", "2e-3"],
    "spread+token_lr": [*PAPER, PLANNING + "init_spread", "0.1", PLANNING + "token_lr", "2e-3"],
    "untied+token_lr": [*PAPER, *UNTIED, PLANNING + "token_lr", "2e-3"],
    "untied+spread+token_lr": [*PAPER, *UNTIED, PLANNING + "init_spread", "0.5", PLANNING + "token_lr", "2e-3"],
    "untied+one_token_per_key": [*PAPER, *UNTIED, *ONE_TOKEN_PER_KEY, PLANNING + "token_lr", "2e-3"],
    "lr1e-3+untied+spread": [
        PLANNING + "n_prefix",
        "3",
        PLANNING + "n_special",
        "2",
        *UNTIED,
        PLANNING + "init_spread",
        "0.5",
    ],
    "lr1e-3+untied": UNTIED,
    "default": [],
    "lr2e-3": [LR, "2e-3", PLANNING + "token_lr", "5e-3"],
    "lora_cot_paper_rate": [*LORA_COT, LR, "2e-4"],
    "lora_cot": LORA_COT,
}
LOSS_LINE = re.compile(r"validation loss:\s+([\d.]+) at step (\d+) -> ([\d.]+) at step (\d+)")
COT_LAYOUT = re.compile(r"(?:[^\n]*\S[^\n]*\n)+#### *\S[^\n]*\s*")  # plain CoT targets: GSM8K's own "#### N" line


def longest_repeat(token_ids: list[int]) -> int:
    """The longest run of one token id repeated back to back."""
    return max((len(list(run)) for _, run in groupby(token_ids)), default=0)


def run_tokenizer(run_dir: Path):
    """The run's tokenizer, planning tokens included: its epoch export's or, for a run that `--steps` stopped
    mid-epoch (no export), the one its last checkpoint was trained with."""
    export = next(run_dir.glob("epoch_*"), None)
    if export is not None:
        return AutoTokenizer.from_pretrained(export, trust_remote_code=False)
    checkpoint = run_dir / "checkpoints/last.ckpt"
    backbone = ModelSpec(name=read_checkpoint(checkpoint)["hyper_parameters"]["backbone"]["name"])
    return read_tokenizer(backbone, checkpoint)


def run_arm(name: str, overrides: list[str], root: Path, max_new_tokens: int, steps: int | None) -> dict:
    """Fit one arm in a subprocess; read its summary lines, validation samples and planning report."""
    command = [sys.executable, str(REPO / "cli.py"), "fit", "--config", "configs/planning_gsm8k.yaml",
               "--config", "configs/presets/cpu_demo.yaml", *overrides,
               "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.name", name,
               "--trainer.enable_progress_bar", "false",
               "--model.init_args.generation.max_new_tokens", str(max_new_tokens)]  # fmt: skip
    if steps:
        command += ["--trainer.max_steps", str(steps)]
    seconds, result = timed(subprocess.run, command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"arm {name} failed:\n{result.stderr[-3000:]}")
    loss = LOSS_LINE.search(result.stdout)
    run_dir = next((root / name).glob("version_*"))
    samples_file = max(run_dir.glob("samples/val_step*.jsonl"), key=lambda path: int(path.stem[8:]))
    rows = [json.loads(line) for line in samples_file.read_text().splitlines()]
    tokenizer = run_tokenizer(run_dir)
    reports = sorted(run_dir.glob("planning/val_step*.json"), key=lambda path: int(path.stem[8:]))
    if reports:
        layout = json.loads(reports[-1].read_text())["layout_share"]
    else:
        layout = sum(COT_LAYOUT.fullmatch(row["completion"]) is not None for row in rows) / len(rows)
    repeats = [longest_repeat(tokenizer(row["completion"], add_special_tokens=False).input_ids) for row in rows]
    return {
        "overrides": overrides,
        "val_loss_start": float(loss.group(1)) if loss else None,
        "val_loss_end": float(loss.group(3)) if loss else None,
        "steps": int(loss.group(4)) if loss else None,
        "layout_share": layout,
        "longest_repeat_per_completion": repeats,
        "accuracy": sum(row["correct"] for row in rows) / len(rows),
        "seconds": round(seconds, 1),
        "samples": str(samples_file),
        "first_completion": rows[0]["completion"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=["default", "lora_cot"], choices=list(ARMS))
    parser.add_argument("--max-new-tokens", type=int, default=256, help="validation generation length")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's epoch)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/planning_demo.json")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        root = args.runs_dir or Path(temporary)
        for name in args.arms:
            results[name] = result = run_arm(name, ARMS[name], root, args.max_new_tokens, args.steps)
            print(f"{name:>16}: val loss {result['val_loss_start']} -> {result['val_loss_end']}, layout "
                  f"{result['layout_share']:.2f}, longest repeat {max(result['longest_repeat_per_completion'])}, "
                  f"accuracy {result['accuracy']:.2f}, {result['seconds']:.0f} s", flush=True)  # fmt: skip
            print(f"{'':>18}first completion: {result['first_completion'][:300]!r}", flush=True)
    settings = {"max_new_tokens": args.max_new_tokens, "steps": args.steps}
    write_json_atomic(args.output, {"settings": settings, "machine": machine(), "arms": results})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
