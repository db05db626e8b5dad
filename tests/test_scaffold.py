"""`cli.py scaffold`: SLURM scripts per run, epoch and task, base controls, submission order, bad input."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from helpers import REPO, fake_commands, run_main
from transformers import AutoTokenizer

from cli import build_cli
from commands.scaffold import RESOURCES_BY_SIZE, model_size, resources_for
from tasks.prompts import PromptFormatter

GSM8K_FIT = [str(REPO / "configs/planning_gsm8k.yaml"), str(REPO / "configs/presets/cpu_demo.yaml")]
GSM8K_DDP = [str(REPO / "configs/planning_gsm8k.yaml"), str(REPO / "configs/presets/gpu_ddp.yaml")]


def sbatch_lines(script: Path) -> list[str]:
    return [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]


def write_questions(path: Path, count: int = 2) -> Path:
    lines = (REPO / "data/gsm8k/test.jsonl").read_text().splitlines()[:count]
    path.write_text("\n".join(lines) + "\n")
    return path


def scaffold_args(experiment: Path, runs: list[dict], *extra: str) -> list[str]:
    return ["scaffold", "--experiment_dir", str(experiment), "--runs", json.dumps(runs), "--slurm.setup", "[]", *extra]


@pytest.mark.parametrize(
    ("name", "row", "expected"),
    [
        ("Llama-3.2-1B-Instruct", 1, ["--cpus-per-task=4", "--mem=32G", "--gres=gpu:1"]),
        ("Llama-3.2-3B-Instruct", 3, ["--cpus-per-task=4", "--mem=64G", "--gres=gpu:1", "--constraint=gpu80"]),
        ("Llama-3.1-8B-Instruct", 8, ["--cpus-per-task=8", "--mem=96G", "--gres=gpu:1", "--constraint=gpu80"]),
        ("Llama-3.3-70B", 70, ["--cpus-per-task=8", "--mem=256G", "--gres=gpu:4", "--constraint=gpu80"]),
        ("Qwen/Qwen2.5-0.5B-Instruct", 1, ["--cpus-per-task=4", "--mem=32G", "--gres=gpu:1"]),
        ("smollm2-135m-instruct", 1, ["--cpus-per-task=4", "--mem=32G", "--gres=gpu:1"]),  # no size: 1B
    ],
)  # fmt: skip
def test_eval_resources_follow_the_model_size_table(name, row, expected, tmp_path):
    assert resources_for(name)[0] == row
    runs = [{"name": "r", "configs": [str(REPO / "configs/planning_gsm8k.yaml")],
             "overrides": [f"--model.init_args.backbone.name={name}", "--trainer.accelerator=gpu"]}]  # fmt: skip
    assert (
        run_main(scaffold_args(tmp_path / "exp", runs, "--slurm.account", "lab", "--slurm.eval_time", "1:00:00")) == 0
    )
    assert sbatch_lines(tmp_path / "exp/r/eval/gsm8k_epoch0.slurm") == [
        "#SBATCH --job-name=eval-gsm8k-r-epoch0",
        f"#SBATCH --output={tmp_path}/exp/r/eval/slurm-%j.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        *(f"#SBATCH {line}" for line in expected[:2]),
        "#SBATCH --time=1:00:00",
        *(f"#SBATCH {line}" for line in expected[2:]),
        "#SBATCH --account=lab",
    ]


def test_model_size_parsing():
    assert [model_size(n) for n in ("Llama-3.2-1B", "Qwen2.5-0.5B-Instruct", "Mixtral-8x7B", "gpt2", "x/13b-chat")] == [
        1.0,
        0.5,
        56.0,
        None,
        13.0,
    ]  # fmt: skip  (Mixtral-8x7B holds ~47B parameters: all 8 experts, not 7B)
    assert resources_for("mistralai/Mixtral-8x7B-v0.1")[1] == RESOURCES_BY_SIZE[70]
    assert resources_for("x/13b-chat")[1] == RESOURCES_BY_SIZE[70]  # between rows: the next larger one


def test_tree_epochs_base_controls_finetune_lines_and_bash_syntax(tmp_path):
    runs = [
        {"name": "one", "configs": GSM8K_FIT, "overrides": ["--trainer.max_epochs=1"]},
        {"name": "two", "configs": GSM8K_FIT, "overrides": ["--trainer.max_epochs=2", "--trainer.accelerator=gpu",
                                                            "--trainer.devices=2", "--trainer.num_nodes=3"]},
    ]  # fmt: skip
    experiment = tmp_path / "exp"
    assert run_main(scaffold_args(experiment, runs, "--slurm.gpus_per_node", "2", "--slurm.account", "lab")) == 2
    # one: 1 device (cpu_demo) while slurm.gpus_per_node is 2 -> refused above; without it both runs scaffold
    assert not experiment.exists()
    assert run_main(scaffold_args(experiment, runs, "--slurm.partition", "gpu")) == 0
    files = sorted(str(p.relative_to(experiment)) for p in experiment.rglob("*"))
    assert files == [
        "one", "one/config.yaml", "one/eval", "one/eval/gsm8k_epoch0.slurm", "one/eval/logs", "one/finetune.slurm",
        "one_base", "one_base/eval", "one_base/eval/gsm8k_base.slurm", "one_base/eval/logs",
        "two", "two/config.yaml", "two/eval", "two/eval/gsm8k_epoch0.slurm", "two/eval/gsm8k_epoch1.slurm",
        "two/eval/logs", "two/finetune.slurm",
        "two_base", "two_base/eval", "two_base/eval/gsm8k_base.slurm", "two_base/eval/logs",
    ]  # fmt: skip
    assert sbatch_lines(experiment / "two/finetune.slurm") == [
        "#SBATCH --job-name=ft-two",
        f"#SBATCH --output={experiment}/two/slurm-%j.out",
        "#SBATCH --nodes=3",  # = trainer.num_nodes
        "#SBATCH --ntasks-per-node=2",  # = trainer.devices
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=32G",
        "#SBATCH --time=24:00:00",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=SIGUSR1@90",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
    ]
    assert "srun python" in (experiment / "two/finetune.slurm").read_text()
    assert not any("gres" in line for line in sbatch_lines(experiment / "one/finetune.slurm"))  # a CPU run
    for script in experiment.rglob("*.slurm"):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        assert os.access(script, os.X_OK)
    # The resolved config is what fit runs, with outputs pinned inside the run directory.
    with pytest.raises(SystemExit) as exit_:
        build_cli(["fit", "--config", str(experiment / "two/config.yaml"), "--print_config"])
    assert exit_.value.code == 0
    config = (experiment / "two/config.yaml").read_text()
    assert f"default_root_dir: {experiment}/two/train" in config and "version: train" in config


def test_existing_scripts_are_kept_unless_overwrite(tmp_path):
    runs = [{"name": "r", "configs": GSM8K_FIT}]
    experiment = tmp_path / "exp"
    assert run_main(scaffold_args(experiment, runs)) == 0
    script = experiment / "r/finetune.slurm"
    script.write_text("# my edits\n")
    assert run_main(scaffold_args(experiment, runs)) == 2
    assert script.read_text() == "# my edits\n"
    assert run_main(scaffold_args(experiment, runs, "--overwrite", "true")) == 0
    assert script.read_text().startswith("#!/bin/bash")


@pytest.mark.parametrize(
    ("runs", "extra", "message"),
    [
        ([{"name": "r", "configs": GSM8K_FIT}], ["--slurm.gpus_per_node", "4"], "must equal the Trainer's devices"),
        ([{"name": "r", "configs": GSM8K_FIT}], ["--slurm.nodes", "2"], "num_nodes is 1 but slurm.nodes is 2"),
        ([{"name": "r", "configs": GSM8K_DDP}], [], "SLURM needs a count"),
        ([{"name": "r", "configs": GSM8K_FIT}], ["--evaluator", "inspect", "--inspect_task", "/nope/task.py"],
         "inspect task file '/nope/task.py' does not exist"),
        ([{"name": "r", "configs": ["/nope.yaml"]}], [], "config file '/nope.yaml' does not exist"),
        ([{"name": "r", "configs": [str(REPO / "configs/slot.yaml")]}], [], "not a fine-tuning config"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_error(runs, extra, message, tmp_path, capsys):
    assert run_main(scaffold_args(tmp_path / "exp", runs, *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "exp").exists()


def test_submit_wires_evaluations_after_their_finetuning(tmp_path, monkeypatch):
    bin_dir = fake_commands(tmp_path / "bin", ("sbatch",))
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    runs = [{"name": "r", "configs": GSM8K_FIT, "overrides": ["--trainer.max_epochs=2"]}]
    experiment = tmp_path / "exp"
    assert run_main(scaffold_args(experiment, runs, "--submit", "true")) == 0
    calls = [json.loads(line) for line in (bin_dir / "calls.jsonl").read_text().splitlines()]
    assert calls[0] == ["sbatch", "--parsable", str(experiment / "r/finetune.slurm")]
    finetune_id = "10001"  # the fake prints "Submitted batch job 1000<n>" for its n-th call
    evaluations = [call for call in calls if "--dependency" in call[2]]
    assert sorted(call[3] for call in evaluations) == [
        str(experiment / "r/eval/gsm8k_epoch0.slurm"), str(experiment / "r/eval/gsm8k_epoch1.slurm")
    ]  # fmt: skip
    assert all(call[2] == f"--dependency=afterok:{finetune_id}" for call in evaluations)
    assert ["sbatch", "--parsable", str(experiment / "r_base/eval/gsm8k_base.slurm")] in calls  # no dependency
    assert json.loads((experiment / "submitted.json").read_text())[str(experiment / "r/finetune.slurm")] == finetune_id


def run_generated(script: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    environment["PATH"] = f"{Path(sys.executable).parent}:{bin_dir}:{os.environ['PATH']}"
    environment["PYTHONPATH"] = str(REPO)
    return subprocess.run(["bash", str(script)], env=environment, capture_output=True, text=True, timeout=600)


def fake_srun(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "srun").write_text('#!/usr/bin/env bash\nexec "$@"\n')
    (folder / "srun").chmod(0o755)
    return folder


@pytest.mark.slow
def test_generated_cli_evaluation_runs_the_test_subcommand(tiny_llama, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl")
    runs = [{"name": "r", "configs": GSM8K_FIT,
             "overrides": [f"--model.init_args.backbone.name={tiny_llama}", f"--data.test_path={questions}",
                           "--model.init_args.generation.max_new_tokens=4",
                           "--trainer.enable_progress_bar=false"]}]  # fmt: skip
    experiment = tmp_path / "exp"
    assert run_main(scaffold_args(experiment, runs)) == 0
    result = run_generated(experiment / "r_base/eval/gsm8k_base.slurm", fake_srun(tmp_path / "bin"))
    assert result.returncode == 0, result.stderr[-3000:]
    (samples,) = (experiment / "r_base/eval/logs/gsm8k/gsm8k_base/samples").glob("test_step*.jsonl")
    assert len(samples.read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("inspect", path=str(Path(sys.executable).parent)) is None,
                    reason="inspect-ai is not installed (pip install -e '.[inspect]'); CI installs it")  # fmt: skip
def test_generated_inspect_evaluation_runs_the_repo_task_file(tiny_llama, tmp_path):
    questions = write_questions(tmp_path / "questions.jsonl")
    system_prompt = 'Think step by step: {braces}, "quotes" and a colon.'
    runs = [{"name": "r", "configs": GSM8K_FIT,
             "overrides": [f"--model.init_args.backbone.name={tiny_llama}", f"--data.test_path={questions}",
                           "--model.init_args.generation.max_new_tokens=4",
                           f"--data.prompt.system_prompt={system_prompt}"]}]  # fmt: skip
    experiment = tmp_path / "exp"
    assert run_main(scaffold_args(experiment, runs, "--evaluator", "inspect")) == 0
    script = experiment / "r_base/eval/gsm8k_base.slurm"
    result = run_generated(script, tmp_path / "bin")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (log,) = (experiment / "r_base/eval/logs").glob("*.eval")
    dumped = subprocess.run(
        [str(Path(sys.executable).parent / "inspect"), "log", "dump", str(log)], capture_output=True, text=True
    )
    record = json.loads(dumped.stdout)
    assert record["status"] == "success" and len(record["samples"]) == 2
    assert record["eval"]["task_args"]["system_prompt"] == system_prompt  # exactly: braces, quotes, colon, comma
    assert record["eval"]["task_args"]["checkpoint"] == str(tiny_llama)  # the evaluated model: planning tokens read
    first = record["samples"][0]
    assert first["messages"][0] == {**first["messages"][0], "role": "system", "content": system_prompt}
    assert set(first["scores"]["answer_scorer"]["value"]) <= {"C", "I"}


@pytest.mark.parametrize("config", sorted((REPO / "configs/slurm").glob("*.yaml")), ids=lambda p: p.name)
def test_every_scaffold_config_scaffolds(config, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # run configs are named relative to the repository root
    assert run_main(["scaffold", "--config", str(config), "--experiment_dir", str(tmp_path / "exp")]) == 0
    scripts = list((tmp_path / "exp").rglob("*.slurm"))
    assert scripts and all(subprocess.run(["bash", "-n", str(s)]).returncode == 0 for s in scripts)


def test_inspect_scorer_removes_the_checkpoints_planning_tokens(tmp_path):
    """A planning-token export's completions reach the scorer without their planning tokens, as in `cli.py test`."""
    import asyncio
    from types import SimpleNamespace

    from integrations.inspect_task import answer_scorer

    export = tmp_path / "epoch_0"
    export.mkdir()
    planning = {"method": "arithmetic", "n_prefix": 3, "n_special": 2, "tokens": {}}
    (export / "training_info.json").write_text(json.dumps({"global_step": 4, "planning": planning}))
    completion = "<prefix_0><prefix_1><prefix_2><answer_0><answer_1> The answer is: 1<prefix_0>8"
    state, target = SimpleNamespace(output=SimpleNamespace(completion=completion)), SimpleNamespace(text="18")
    with_planning = asyncio.run(answer_scorer("gsm8k", str(export))(state, target))
    without = asyncio.run(answer_scorer("gsm8k")(state, target))
    assert (with_planning.value, with_planning.answer) == ("C", "18")
    assert without.answer != "18"  # read raw, the planning token splits the number


def script_command(script: Path, program: str) -> list[str]:
    """The arguments after `program` of the script's srun line (continuations joined, its variables filled)."""
    text = script.read_text().replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.MULTILINE))
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    for name, value in variables.items():
        line = line.replace(f'"${name}"', value)
    words = shlex.split(line)
    return words[next(i for i, word in enumerate(words) if word.endswith(program)) + 1 :]


def test_base_control_evaluates_the_untouched_model_with_the_runs_prompt(tiny_llama, tmp_path):
    """Upstream's base controls: the same data and prompt "for fair comparison", and the base model as it is (the
    run's planning tokens are neither added to it nor appended to its prompt)."""
    runs = [{"name": "r", "configs": GSM8K_FIT, "overrides": [f"--model.init_args.backbone.name={tiny_llama}"]}]
    assert run_main(scaffold_args(tmp_path / "exp", runs)) == 0
    base = build_cli(script_command(tmp_path / "exp/r_base/eval/gsm8k_base.slurm", "cli.py")[1:], run=False)
    run_config = yaml.safe_load((tmp_path / "exp/r/config.yaml").read_text())
    assert run_config["model"]["init_args"]["planning"]["method"] == "arithmetic"  # the run trains planning tokens
    untouched = AutoTokenizer.from_pretrained(tiny_llama)
    assert not base.model.planning.active and len(base.model.tokenizer) == len(untouched)
    assert asdict(base.datamodule.prompt) == run_config["data"]["prompt"]  # the run's prompt
    base.datamodule.setup("test")
    batch = next(iter(base.datamodule.test_dataloader()))
    ids = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    assert ids == PromptFormatter(untouched, base.datamodule.prompt).encode_prompt(batch["question"][0])
