"""inspect-ai task over reasoning-lab's data, prompts and answer scoring (inspect-ai is an optional extra).

    inspect eval integrations/inspect_task.py@reasoning --model hf/local -M model_path=runs/.../epoch_0 \
        --task-config task_args.yaml --log-dir ./logs

The task arguments (`-T key=value` or a `--task-config` YAML file, which `cli.py scaffold` writes so that
templates with braces or colons survive inspect's YAML parsing of `-T` values) are those of `reasoning`
below. Questions are read with the project's own task readers, the prompt is the training template and
system prompt, and completions are scored by `tasks.scoring` exactly as `cli.py test` scores them.
"""

from __future__ import annotations

from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ChatMessageSystem, ChatMessageUser
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, accuracy, scorer, stderr
from inspect_ai.solver import TaskState, generate

from models.loader import read_planning
from tasks.examples import get_task, load_examples, seeded_subset
from tasks.scoring import score_completion


@task
def reasoning(
    data_path: str,
    task_name: str = "gsm8k",
    prompt: str = "{question}",
    system_prompt: str = "",
    answer_format: str = "",
    limit: int = 0,
    seed: int = 0,
    checkpoint: str = "",
) -> Task:
    """Answer accuracy on the questions of `data_path`.

    Args:
        data_path: a .jsonl / .json file in the format of `task_name` (as `cli.py test` reads it).
        task_name: the project task that reads the file: gsm8k, math, aqua or instruction.
        prompt: the user message; `{question}` is replaced by the question (the training template).
        system_prompt: a system message ("" for none).
        answer_format: how answers are extracted and compared (default: the task's own).
        limit: only this many questions, the seeded subset `cli.py test --data.test_limit` takes (0 = all).
        seed: seed of that subset (the run's `data.seed`).
        checkpoint: the evaluated model's folder (an `epoch_N/` export): its planning tokens, read by the project's
            loader, are removed from completions before scoring, as `cli.py test` does ("" = none).
    """
    reader = get_task(task_name)
    examples = seeded_subset(load_examples(reader, str(Path(data_path)), "test"), limit, seed)
    system = [ChatMessageSystem(content=system_prompt)] if system_prompt else []
    samples = [  # messages as given: inspect's system_message() would treat braces in the prompt as fields
        Sample(
            id=example.id,
            input=[*system, ChatMessageUser(content=prompt.replace("{question}", example.question))],
            target=example.answer,
        )
        for example in examples
    ]
    return Task(
        dataset=MemoryDataset(samples, name=Path(data_path).stem),
        solver=generate(),
        scorer=answer_scorer(answer_format or reader.answer_format, checkpoint),
    )


@scorer(metrics=[accuracy(), stderr()])
def answer_scorer(answer_format: str, checkpoint: str = ""):
    """Correct when the answer extracted from the completion, without the checkpoint's planning tokens, matches
    the gold answer (tasks.scoring)."""
    planning = read_planning(checkpoint or None)

    async def score(state: TaskState, target: Target) -> Score:
        completion = planning.remove_tokens(state.output.completion)
        prediction, correct = score_completion(answer_format, completion, target.text)
        return Score(value=CORRECT if correct else INCORRECT, answer=prediction or "", explanation=completion)

    return score
