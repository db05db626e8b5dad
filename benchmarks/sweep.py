"""Accuracy across checkpoints: `cli.py sweep` vs one `cli.py test` per checkpoint (the obvious alternative).

A short LoRA + planning-token run of the embedded model (3 epochs of 2 steps: exports epoch_0/, epoch_1/ and the
Lightning checkpoint of step 6) is evaluated both ways on the same questions and settings:
- one `cli.py test` process per checkpoint, as one would script it (the Lightning checkpoint with --ckpt_path,
  an export as the SLURM evaluations run it, the base model with its planning tokens off);
- one `cli.py sweep --folder RUN` process.
It checks that both give every checkpoint the same per-question correctness and completions, and prints the
wall time of each, per checkpoint, and their ratio.

    python benchmarks/sweep.py [--questions 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, timed

from core.io import write_json_atomic

CONFIGS = [
    *("--config", str(REPO / "configs/planning_gsm8k.yaml")),
    *("--config", str(REPO / "configs/presets/cpu_demo.yaml")),
]


def cli(*args: str) -> float:
    """Run `python cli.py ARGS` in a fresh process; its wall seconds."""
    seconds, result = timed(subprocess.run, [sys.executable, str(REPO / "cli.py"), *args], capture_output=True,
                            text=True, cwd=REPO)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"cli.py {' '.join(args[:3])} failed:\n{result.stderr[-3000:]}")
    return seconds


def read_rows(path: Path) -> dict[str, tuple[str, bool]]:
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {row["id"]: (row["completion"], row["correct"]) for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/sweep.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-benchmark-"))
    evaluation = ["--data.test_limit", str(args.questions), "--model.init_args.generation.max_new_tokens",
                  str(args.max_new_tokens), "--trainer.enable_progress_bar", "false"]  # fmt: skip
    fit_seconds = cli("fit", *CONFIGS, "--trainer.max_epochs", "3", "--data.train_limit", "8",
                      "--trainer.limit_val_batches", "0", *evaluation[2:],
                      "--trainer.logger.init_args.save_dir", str(work / "runs"))  # fmt: skip
    run = work / "runs/planning_gsm8k/version_0"
    per_checkpoint = {
        "base_model": ["--model.init_args.planning.method", "none", "--model.init_args.mode", "full"],
        "epoch_0": ["--model.init_args.backbone.name", str(run / "epoch_0"), "--model.init_args.mode", "full"],
        "epoch_1": ["--model.init_args.backbone.name", str(run / "epoch_1"), "--model.init_args.mode", "full"],
        "epoch2-step6.ckpt": ["--ckpt_path", str(run / "checkpoints/epoch2-step6.ckpt")],
    }
    test_seconds, tested = {}, {}
    for name, extra in per_checkpoint.items():
        save_dir = work / "tests" / name
        test_seconds[name] = cli("test", *CONFIGS, *evaluation, *extra, "--trainer.logger.init_args.save_dir",
                                 str(save_dir))  # fmt: skip
        (samples,) = save_dir.glob("planning_gsm8k/version_*/samples/test_step*.jsonl")
        tested[name] = read_rows(samples)
    generation = json.dumps({"max_new_tokens": args.max_new_tokens})
    sweep_seconds = cli("sweep", "--folder", str(run), "--test_limit", str(args.questions),
                        "--generation", generation)  # fmt: skip
    same = {name: read_rows(run / "sweep/gsm8k" / f"{name}.jsonl") == rows for name, rows in tested.items()}
    total_tests = sum(test_seconds.values())
    result = {
        "machine": machine(),
        "settings": {"questions": args.questions, "max_new_tokens": args.max_new_tokens, "checkpoints": 4},
        "fit_seconds": round(fit_seconds, 1),
        "test_per_checkpoint_seconds": {name: round(value, 1) for name, value in test_seconds.items()},
        "tests_total_seconds": round(total_tests, 1),
        "sweep_total_seconds": round(sweep_seconds, 1),
        "sweep_per_checkpoint_seconds": round(sweep_seconds / len(tested), 1),
        "tests_over_sweep": round(total_tests / sweep_seconds, 2),
        "same_completions_and_correctness": same,
    }
    write_json_atomic(Path(args.output), result)
    print(json.dumps(result, indent=2))
    print(f"one test per checkpoint / sweep: {result['tests_over_sweep']}x; identical per checkpoint: {same}")


if __name__ == "__main__":
    main()
