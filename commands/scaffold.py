"""`python cli.py scaffold`: SLURM scripts for an experiment: fine-tuning runs, their evaluations, base controls.

For each run (a stack of configs plus overrides), under `{experiment_dir}/`:

    {run}/config.yaml                  the resolved config (what `fit` runs; outputs pinned to {run}/train/)
    {run}/finetune.slurm               srun-launched fit, requeued at the time limit and resumed
    {run}/eval/{task}_epoch{N}.slurm   one per epoch the run will export (0-indexed), and eval/logs/
    {run}_base/eval/{task}_base.slurm  the base model on the same data and prompt (a control), and eval/logs/

Evaluation scripts run either `cli.py test` on `{run}/train/epoch_{N}/` or inspect-ai with the repo's task
file (integrations/inspect_task.py), with the run's data, prompt and system prompt baked in at scaffolding
time, so training and evaluation match. With `submit`, fine-tuning jobs are submitted first and their
evaluations with `--dependency=afterok:<job>`, so they never start before their checkpoints exist.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from commands.lightning_cli import resolve_config  # the CLI's own parser: validated exactly as `fit` would
from core.errors import UserInputError
from core.io import write_json_atomic, write_text_atomic
from tasks.examples import get_task

REPO = Path(__file__).resolve().parents[1]
INSPECT_TASK = REPO / "integrations" / "inspect_task.py"


@dataclass(frozen=True)
class Resources:
    """SLURM resources of one job (per node)."""

    mem: str
    gpus: int
    constraint: str | None
    cpus: int


# The scaffolding guide's model-size table; a size not in it takes the next larger row, an unknown size 1B.
RESOURCES_BY_SIZE = {
    1: Resources("32G", 1, None, 4),
    3: Resources("64G", 1, "gpu80", 4),
    8: Resources("96G", 1, "gpu80", 8),
    70: Resources("256G", 4, "gpu80", 8),
}


def model_size(name: str) -> float | None:
    """Billions of parameters named in a model id ("Llama-3.2-3B-Instruct" -> 3, "Qwen2.5-0.5B" -> 0.5). A mixture
    of experts "NxMB" counts every expert (Mixtral-8x7B -> 56: memory holds all of them; an upper bound, as the
    experts share their attention layers)."""
    experts = re.search(r"(?<![\d.])(\d+)x(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", Path(name).name)
    if experts:
        return int(experts.group(1)) * float(experts.group(2))
    match = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", Path(name).name)
    return float(match.group(1)) if match else None


def resources_for(name: str) -> tuple[int, Resources]:
    """(table row, resources) for model `name`."""
    size = model_size(name)
    row = next((row for row in RESOURCES_BY_SIZE if size is not None and size <= row), None)
    if row is None:
        row = 1 if size is None else max(RESOURCES_BY_SIZE)
    return row, RESOURCES_BY_SIZE[row]


@dataclass
class RunSpec:
    """One fine-tuning run of the experiment."""

    name: str
    """Run directory name (letters, digits, `._-`)."""
    configs: list[str]
    """Config files, stacked left to right as with `cli.py fit --config A --config B`."""
    overrides: list[str] = field(default_factory=list)
    """Command-line overrides, e.g. ["--model.init_args.lora.r=32", "--trainer.max_epochs=2"]."""


@dataclass
class SlurmSpec:
    """Cluster settings shared by every script."""

    account: str | None = None
    """`#SBATCH --account` (None: no line)."""
    partition: str | None = None
    """`#SBATCH --partition` (None: no line)."""
    finetune_time: str = "24:00:00"
    """Time limit of fine-tuning jobs; they requeue themselves at the limit and resume."""
    eval_time: str = "0:30:00"
    """Time limit of evaluation jobs."""
    nodes: int | None = None
    """Nodes per fine-tuning job; must equal the config's trainer.num_nodes (None: take the config's)."""
    gpus_per_node: int | None = None
    """GPUs per node; must equal the config's trainer.devices (required when the config says -1/auto)."""
    setup: list[str] = field(default_factory=lambda: [f"source {shlex.quote(str(REPO / '.venv/bin/activate'))}"])
    """Environment lines run before the job, e.g. ["module load anaconda3/2025.6", "conda activate lab"]."""
    environment: dict[str, str] = field(default_factory=dict)
    """Variables exported before the job, e.g. {"HF_HOME": "/scratch/hf"}."""
    requeue_seconds: int = 90
    """`--signal=SIGUSR1@<seconds>`: warning before the time limit to save and requeue."""


def scaffold(
    experiment_dir: Path,
    runs: list[RunSpec],
    evaluator: Literal["cli", "inspect"] = "cli",
    tasks: list[str] | None = None,
    slurm: SlurmSpec | None = None,
    base_controls: bool = True,
    inspect_task: Path = INSPECT_TASK,
    overwrite: bool = False,
    submit: bool = False,
) -> None:
    """Write the SLURM scripts of an experiment (and, with `submit`, submit them in dependency order).

    Args:
        experiment_dir: where the run directories go.
        runs: the fine-tuning runs.
        evaluator: cli (`cli.py test` on each epoch export) or inspect (inspect-ai with the repo's task file).
        tasks: tasks to evaluate on (gsm8k, math, aqua; their bundled test files); None: each run's own data.
        slurm: cluster settings.
        base_controls: also evaluate each run's base model (`{run}_base/eval/{task}_base.slurm`).
        inspect_task: the inspect-ai task file (evaluator inspect).
        overwrite: replace scripts already in `experiment_dir` (otherwise refuse).
        submit: submit with sbatch: fine-tuning first, evaluations after it (`--dependency=afterok`).
    """
    experiment_dir, slurm = Path(experiment_dir).resolve(), slurm or SlurmSpec()
    check_slurm_values(slurm)
    if not runs:
        raise UserInputError("scaffold: no runs given (runs: [{name, configs, overrides}])")
    if evaluator == "inspect" and not Path(inspect_task).is_file():
        raise UserInputError(f"scaffold: inspect task file '{inspect_task}' does not exist")
    if submit and shutil.which("sbatch") is None:
        raise UserInputError("scaffold --submit: sbatch is not on PATH (run it on the cluster's login node)")
    plans = [plan_run(experiment_dir, run, slurm, tasks, evaluator, base_controls, Path(inspect_task)) for run in runs]
    existing = [path for plan in plans for path in plan.files if path.exists()]
    if existing and not overwrite:
        raise UserInputError(
            f"scaffold: {experiment_dir} already holds scripts (e.g. {existing[0]}); pass --overwrite true to replace"
        )
    for plan in plans:
        for path, text in plan.files.items():
            write_text_atomic(path, text)
            if path.suffix == ".slurm":
                path.chmod(0o755)
        for folder in plan.log_dirs:
            folder.mkdir(parents=True, exist_ok=True)
    print(f"Scaffolded {len(plans)} run(s) in {experiment_dir}:")
    for path in sorted(path for plan in plans for path in plan.files):
        print(f"  {path.relative_to(experiment_dir)}")
    if submit:
        submit_all(experiment_dir, plans)


def check_slurm_values(slurm: SlurmSpec) -> None:
    """Values that go into `#SBATCH` and `export` lines: environment names are shell names, header values are one
    line without spaces (sbatch reads each `#SBATCH` line; a newline would start a shell line)."""
    for key in slurm.environment:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(key)):
            raise UserInputError(f"scaffold: slurm.environment key {str(key)!r} is not a shell variable name")
    for name in ("account", "partition", "finetune_time", "eval_time"):
        value = getattr(slurm, name)
        if value is not None and not re.fullmatch(r"[\w.:,@+=-]+", str(value)):
            raise UserInputError(f"scaffold: slurm.{name} {str(value)!r} holds spaces or characters sbatch refuses")
    if any("\n" in line or "\r" in line for line in slurm.setup):
        raise UserInputError("scaffold: slurm.setup: give one command per list item (no line breaks inside one)")


@dataclass
class RunPlan:
    finetune: Path
    evaluations: list[Path]
    controls: list[Path]
    files: dict[Path, str]
    log_dirs: list[Path]


def plan_run(
    experiment_dir: Path,
    run: RunSpec,
    slurm: SlurmSpec,
    tasks: list[str] | None,
    evaluator: str,
    base_controls: bool,
    inspect_task: Path,
) -> RunPlan:
    """Every file of one run, as text (nothing written yet)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]+", run.name) or run.name in (".", ".."):
        raise UserInputError(
            f"scaffold: run name '{run.name}' may only hold letters, digits, '.', '_' and '-' (and is not '.' or '..')"
        )
    for config in run.configs:
        if not Path(config).is_file():
            raise UserInputError(f"scaffold: run '{run.name}': config file '{config}' does not exist")
    run_dir, control_dir = experiment_dir / run.name, experiment_dir / f"{run.name}_base"
    pinned = [  # outputs and hpc checkpoints in {run}/train/, resumed in place by the requeued job
        f"--trainer.default_root_dir={run_dir / 'train'}",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.logger.init_args.name=",
        "--trainer.logger.init_args.version=train",
        "--export.dirpath=null",
    ]
    args = [arg for config in run.configs for arg in ("--config", str(Path(config).resolve()))]
    _, config = resolve_config([*args, *run.overrides, *pinned])
    nodes, gpus = cluster_shape(run.name, config, slurm)
    text, config = resolve_config([*args, *run.overrides, *pinned, f"--trainer.devices={gpus}"])
    if not str(config.model.class_path).endswith("CausalLMFineTuner"):
        raise UserInputError(
            f"scaffold: run '{run.name}' is not a fine-tuning config (model: {config.model.class_path})"
        )
    epochs = config.trainer.max_epochs
    if not isinstance(epochs, int) or epochs < 1:
        raise UserInputError(f"scaffold: run '{run.name}': trainer.max_epochs must be set (it names epoch_N/)")
    if not config.export.enabled or config.export.adapter_only:
        raise UserInputError(
            f"scaffold: run '{run.name}': evaluations need full epoch exports (export.enabled true, adapter_only false)"
        )
    backbone = config.model.init_args.backbone.name
    row, eval_resources = resources_for(backbone)
    gpu_job = config.trainer.accelerator != "cpu"
    settings = Settings(slurm, inspect_task, config, gpu_job)
    files = {run_dir / "config.yaml": text}
    header = sbatch_header(
        f"ft-{run.name}", run_dir / "slurm-%j.out", slurm.finetune_time, replace(eval_resources, gpus=gpus), settings,
        nodes=nodes, tasks_per_node=gpus,
        extra=[f"--signal=SIGUSR1@{slurm.requeue_seconds}", "--requeue", "--open-mode=append"],
    )  # fmt: skip
    files[run_dir / "finetune.slurm"] = script(
        header,
        settings,
        f"# {backbone}: {row}B row of the resources table; {nodes} node(s) x {gpus} task(s), one per device.\n"
        "# A requeued job resumes from train/hpc_ckpt_<n>.ckpt by itself (Lightning's SLURM support).\n"
        f"srun python {q(REPO / 'cli.py')} fit --config {q(run_dir / 'config.yaml')}",
    )
    evaluations, controls = [], []
    for task_name, data_path in eval_tasks(run.name, config, tasks):
        for epoch in range(epochs):
            path = run_dir / "eval" / f"{task_name}_epoch{epoch}.slurm"
            model_path = run_dir / "train" / f"epoch_{epoch}"
            files |= eval_script(
                path, f"eval-{task_name}-{run.name}-epoch{epoch}", str(model_path), task_name, data_path,
                eval_resources, settings, evaluator, run_dir / "config.yaml",
            )  # fmt: skip
            evaluations.append(path)
        if base_controls:
            path = control_dir / "eval" / f"{task_name}_base.slurm"
            files |= eval_script(
                path, f"eval-{task_name}-{run.name}-base", backbone, task_name, data_path,
                eval_resources, settings, evaluator, run_dir / "config.yaml", base_control=True,
            )  # fmt: skip
            controls.append(path)
    log_dirs = [run_dir / "eval" / "logs"] + ([control_dir / "eval" / "logs"] if base_controls else [])
    return RunPlan(run_dir / "finetune.slurm", evaluations, controls, files, log_dirs)


def cluster_shape(name: str, config, slurm: SlurmSpec) -> tuple[int, int]:
    """(nodes, GPUs per node) of a run: the Trainer's num_nodes and devices, checked against `slurm`."""
    devices, nodes = config.trainer.devices, config.trainer.num_nodes
    if isinstance(devices, list):
        devices = len(devices)
    elif isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices in (-1, "auto"):
        if slurm.gpus_per_node is None:
            raise UserInputError(
                f"scaffold: run '{name}': trainer.devices is {config.trainer.devices!r}; SLURM needs a count: "
                "set slurm.gpus_per_node (or --trainer.devices N in the run's overrides)"
            )
        devices = slurm.gpus_per_node
    if not isinstance(devices, int) or devices < 1:
        raise UserInputError(f"scaffold: run '{name}': trainer.devices must be a positive count, got {devices!r}")
    if slurm.gpus_per_node is not None and slurm.gpus_per_node != devices:
        raise UserInputError(
            f"scaffold: run '{name}': trainer.devices is {devices} but slurm.gpus_per_node is {slurm.gpus_per_node}; "
            "--ntasks-per-node must equal the Trainer's devices: make them agree"
        )
    if slurm.nodes is not None and slurm.nodes != nodes:
        raise UserInputError(
            f"scaffold: run '{name}': trainer.num_nodes is {nodes} but slurm.nodes is {slurm.nodes}; make them agree"
        )
    return nodes, devices


def eval_tasks(name: str, config, tasks: list[str] | None) -> list[tuple[str, str]]:
    """(task name, absolute test file) pairs to evaluate a run on."""
    if tasks is None:
        task = get_task(config.data.task)
        source = config.data.test_path or task.bundled.get("test")
        if source is None:
            raise UserInputError(f"scaffold: run '{name}': data.test_path is needed to evaluate task '{task.name}'")
        return [(task.name, str(Path(source).resolve()) if Path(source).exists() else str(source))]
    pairs = []
    for task_name in tasks:
        task = get_task(task_name)
        if "test" not in task.bundled:
            raise UserInputError(f"scaffold: task '{task_name}' bundles no test file; evaluate it from a run's data")
        pairs.append((task_name, str(task.bundled["test"])))
    return pairs


@dataclass
class Settings:
    slurm: SlurmSpec
    inspect_task: Path
    config: object
    gpu_job: bool


def sbatch_header(
    job: str,
    output: Path,
    time: str,
    resources: Resources,
    settings: Settings,
    nodes: int = 1,
    tasks_per_node: int = 1,
    extra: list[str] = (),
) -> list[str]:
    slurm = settings.slurm
    lines = [
        f"--job-name={job}",
        f"--output={output}",
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--cpus-per-task={resources.cpus}",
        f"--mem={resources.mem}",
        f"--time={time}",
    ]
    if settings.gpu_job:
        lines.append(f"--gres=gpu:{resources.gpus}")
        if resources.constraint:
            lines.append(f"--constraint={resources.constraint}")
    lines += [f"--account={slurm.account}"] * bool(slurm.account)
    lines += [f"--partition={slurm.partition}"] * bool(slurm.partition)
    return [f"#SBATCH {line}" for line in [*lines, *extra]]


def script(header: list[str], settings: Settings, body: str) -> str:
    environment = [f"export {key}={q(value)}" for key, value in settings.slurm.environment.items()]
    return "\n".join(
        ["#!/bin/bash", *header, "", "set -euo pipefail", *settings.slurm.setup, *environment, "", body, ""]
    )


def eval_script(
    path: Path,
    job: str,
    model_path: str,
    task_name: str,
    data_path: str,
    resources: Resources,
    settings: Settings,
    evaluator: str,
    run_config: Path,
    base_control: bool = False,
) -> dict[Path, str]:
    """One evaluation job (the script, and for inspect its task arguments): the model at `model_path` on
    `data_path`, logs in the script's eval/logs/. A base control evaluates the backbone as it is: no planning
    tokens added, no planning prefix after the prompt (the run's prompt and data otherwise)."""
    eval_dir, config = path.parent, settings.config
    header = sbatch_header(job, eval_dir / "slurm-%j.out", settings.slurm.eval_time, resources, settings)
    if evaluator == "cli":
        body = "\n".join(
            [
                f"MODEL_PATH={q(model_path)}",
                f"DATA_PATH={q(data_path)}",
                f"srun python {q(REPO / 'cli.py')} test --config {q(run_config)} \\",
                '  --model.init_args.backbone.name "$MODEL_PATH" --model.init_args.mode full \\',
                *(["  --model.init_args.planning.method none \\"] if base_control else []),
                f'  --data.task {task_name} --data.test_path "$DATA_PATH" \\',
                "  --trainer.devices 1 --trainer.num_nodes 1 --trainer.strategy auto \\",
                f"  --trainer.logger.init_args.save_dir {q(eval_dir / 'logs')} \\",
                f"  --trainer.logger.init_args.name {task_name} --trainer.logger.init_args.version {path.stem}",
            ]
        )
        return {path: script(header, settings, body)}
    prompt = config.data.prompt
    task_args = path.with_suffix(".task.json")
    arguments = {
        "data_path": data_path,
        "task_name": task_name,
        "prompt": prompt.template if prompt.style == "plain" else "{question}",
        "system_prompt": prompt.system_prompt or "",
        "checkpoint": model_path,
    }
    chat = "" if prompt.style == "chat" else " -M use_chat_template=false"
    body = "\n".join(
        [
            f"MODEL_PATH={q(model_path)}",
            "# Data, prompt and system prompt of the run, in a file: inspect parses `-T key=value` as YAML and",
            "# splits values at commas, which would mangle prompts.",
            f"TASK_ARGS={q(task_args)}",
            f"cd {q(eval_dir)}",
            f"inspect eval {q(settings.inspect_task)}@reasoning \\",
            f'  --model hf/local -M model_path="$MODEL_PATH"{chat} --task-config "$TASK_ARGS" \\',
            f"  --max-tokens {config.model.init_args.generation.max_new_tokens} --log-dir ./logs --log-level info",
            'echo "Evaluation complete"',
        ]
    )
    return {path: script(header, settings, body), task_args: json.dumps(arguments, indent=2) + "\n"}


def q(value: object) -> str:
    return shlex.quote(str(value))


def submit_all(experiment_dir: Path, plans: list[RunPlan]) -> None:
    """sbatch every script: each fine-tuning job, then its evaluations after it; controls right away."""
    jobs: dict[str, str] = {}
    for plan in plans:
        finetune = sbatch([str(plan.finetune)])
        jobs[str(plan.finetune)] = finetune
        for path in plan.evaluations:
            jobs[str(path)] = sbatch([f"--dependency=afterok:{finetune}", str(path)])
        for path in plan.controls:
            jobs[str(path)] = sbatch([str(path)])
    write_json_atomic(experiment_dir / "submitted.json", jobs)
    print(f"Submitted {len(jobs)} job(s); ids in {experiment_dir / 'submitted.json'}")


def sbatch(args: list[str]) -> str:
    result = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, check=False)
    match = re.search(r"(\d+)(?:;\S+)?\s*$", result.stdout)
    if result.returncode != 0 or match is None:
        raise UserInputError(f"sbatch {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}")
    return match.group(1)
