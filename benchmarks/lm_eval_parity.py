"""The decoding study's task, greedy, run by us and by lm-eval itself on the same model: completions and correctness.

1. Ours: `cli.py test --config configs/decoding_gsm8k.yaml --config configs/decoding/greedy.yaml --data.test_limit N`
   (lm-eval renders prompts, stop strings and length; our HF engine generates; the task's filter and metric score).
2. lm-eval's: the same task (configs/lm_eval/gsm8k_fewshot.yaml) through `lm_eval.evaluator.evaluate` with its own
   HF model (HFLM, fp32, CPU, batch size 1), as upstream's run.py calls it, on the same questions (`samples`), greedy
   (gen_kwargs do_sample=False, temperature=0). One sample per question: repeats 1 and only the "score-first"
   filter (upstream's maj@8/16/32 filters need 8/16/32 samples; lm-eval refuses them with fewer).
Writes benchmarks/results/lm_eval_parity.json: per question both completions and scores, and the counts.

    python benchmarks/lm_eval_parity.py [--questions 16] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, timed

from core.io import write_json_atomic
from models.loading import resolve_model_path

TASK = "gsm8k_fewshot"


def our_run(model: str, questions: int, save_dir: Path) -> dict[str, dict]:
    """Our `test` rows of the study, greedy, by question id."""
    command = [sys.executable, "cli.py", "test", "--config", "configs/decoding_gsm8k.yaml",
               "--config", "configs/decoding/greedy.yaml", "--data.test_limit", str(questions),
               "--model.init_args.backbone.name", model, "--trainer.accelerator", "cpu",
               "--trainer.logger.init_args.save_dir", str(save_dir),
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True)
    samples = save_dir / "decoding_gsm8k/version_0/samples/test_step0.jsonl"
    return {row["id"]: row for row in map(json.loads, samples.read_text().splitlines())}


def lm_eval_run(model_path: str, indices: list[int]) -> dict[int, dict]:
    """lm-eval's own greedy run of the task on the docs at `indices`: its logged sample per doc index."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict([TASK], TaskManager(include_path="configs/lm_eval"))[TASK]
    task.set_config(key="generation_kwargs", value={"do_sample": False, "temperature": 0.0}, update=True)
    task.set_config(key="repeats", value=1)
    task._filters = [ensemble for ensemble in task._filters if ensemble.name == "score-first"]
    lm = HFLM(pretrained=model_path, dtype="float32", device="cpu", batch_size=1)
    results = evaluate(lm=lm, task_dict={TASK: task}, samples={TASK: indices}, log_samples=True)
    return {int(sample["doc_id"]): sample for sample in results["samples"][TASK]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/lm_eval_parity.json"))
    args = parser.parse_args()
    os.chdir(REPO)  # the task's include path and data files are relative to the repository root
    with tempfile.TemporaryDirectory() as save_dir:
        ours_s, ours = timed(our_run, args.model, args.questions, Path(save_dir))
    indices = sorted(int(question_id.split("-")[1]) for question_id in ours)
    lm_eval_s, theirs = timed(lm_eval_run, str(resolve_model_path(args.model)), indices)
    rows = []
    for index in indices:
        row, sample = ours[f"test-{index}"], theirs[index]
        rows.append({
            "id": row["id"], "gold": str(sample["target"]),
            "ours": {"completion": row["completion"], "prediction": row["prediction"],
                     "exact_match": row["lm_eval"]["score-first"]["exact_match"], "correct": row["correct"]},
            "lm_eval": {"completion": sample["resps"][0][0], "prediction": sample["filtered_resps"][0],
                        "exact_match": float(sample["exact_match"])},
        })  # fmt: skip
    same = sum(r["ours"]["completion"] == r["lm_eval"]["completion"] for r in rows)
    result = {
        "model": args.model,
        "task": f"configs/lm_eval/{TASK}.yaml, greedy, 1 sample, lm-eval HFLM fp32 batch 1 vs ours (config's batch)",
        "questions": len(rows),
        "identical_completions": same,
        "identical_predictions": sum(r["ours"]["prediction"] == r["lm_eval"]["prediction"] for r in rows),
        "correct_ours": sum(r["ours"]["exact_match"] for r in rows),
        "correct_lm_eval": sum(r["lm_eval"]["exact_match"] for r in rows),
        "same_correctness_per_question": sum(r["ours"]["exact_match"] == r["lm_eval"]["exact_match"] for r in rows),
        "wall_s": {"ours": round(ours_s, 1), "lm_eval": round(lm_eval_s, 1)},
        "machine": machine(),
        "rows": rows,
    }
    write_json_atomic(Path(args.output), result)
    print(json.dumps({key: value for key, value in result.items() if key != "rows"}, indent=1))
    if same != len(rows):
        raise SystemExit(f"{len(rows) - same} of {len(rows)} completions differ")


if __name__ == "__main__":
    main()
