"""Files others produced never run code or choose where we write: checkpoints, exports and tokenizer files that ask
for remote code are refused in one line (the code never runs), and names that would escape their folder too."""

from __future__ import annotations

import builtins
import importlib.metadata
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_args

from cli import main
from core.errors import UserInputError
from core.io import check_inside, check_name
from models.loader import load_trained
from models.loading import ModelSpec

REFUSED_REMOTE_CODE = "records backbone.trust_remote_code: true; code shipped with a model runs only when you ask"
NEEDS_OWN_CODE = "needs its own Python code to load"


def marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('the file ran')\n"


def remote_code_folder(folder: Path, source: Path, marker: Path) -> Path:
    """A copy of the model folder `source` whose config.json and tokenizer_config.json name their own classes
    (an `auto_map`, model type `evil`), in modules that create `marker` when imported."""
    shutil.copytree(source, folder)
    code = marker_code(marker)
    (folder / "configuration_evil.py").write_text(
        code + "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
    )
    (folder / "modeling_evil.py").write_text(
        code + "from transformers import LlamaForCausalLM\n\nclass EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    (folder / "tokenization_evil.py").write_text(
        code + "from transformers import PreTrainedTokenizerFast\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "evil",
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer |= {
        "tokenizer_class": "EvilTokenizer",
        "auto_map": {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture
def attack(tiny_llama, tmp_path, monkeypatch):
    """A model folder with code that writes a marker when imported, a weights_only-loadable checkpoint and an
    export folder that both record it as the backbone with trust_remote_code true; `input` must never be asked."""
    marker = tmp_path / "MARKER"
    evil = remote_code_folder(tmp_path / "evil-model", tiny_llama, marker)
    backbone = {"name": str(evil), "trust_remote_code": True, "dtype": "float32"}
    run = tmp_path / "shared-run"
    run.mkdir()
    checkpoint = run / "epoch0-step2.ckpt"
    hparams = {"backbone": backbone, "mode": "full", "_class_path": "lightning_modules.finetune.CausalLMFineTuner"}
    torch.save({"state_dict": {}, "global_step": 2, "hyper_parameters": hparams}, checkpoint)
    export = run / "epoch_0"
    shutil.copytree(tiny_llama, export)
    (export / "training_info.json").write_text(json.dumps({"global_step": 4, "backbone": backbone}))

    def no_prompt(*args, **kwargs):
        raise AssertionError("asked on stdin whether to run a file's code")

    monkeypatch.setattr(builtins, "input", no_prompt)
    return {"marker": marker, "evil": evil, "checkpoint": checkpoint, "export": export, "run": run}


def one_error_line(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_test_with_a_checkpoint_asking_for_remote_code_is_refused(attack, tiny_llama, tmp_path, capsys):
    """`test --ckpt_path` re-applies a checkpoint's settings; before, its backbone (name and remote code) came along."""
    args = tiny_args(tiny_llama, tmp_path / "runs", "--ckpt_path", str(attack["checkpoint"]), "--data.test_limit", "2")
    at = args.index("--model.init_args.backbone.name")
    args = args[:at] + args[at + 2 :]  # the config's own backbone: the checkpoint records another one
    line = one_error_line(["test", *args], capsys)
    assert REFUSED_REMOTE_CODE in line and str(attack["checkpoint"]) in line
    assert not attack["marker"].exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["class path", "setting"])
def test_a_class_path_recorded_in_a_checkpoint_is_never_imported(where, tiny_llama, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "MARKER"
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules/shared_module.py").write_text(marker_code(marker) + "class Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    hparams = {"mode": "full", "_class_path": "shared_module.Model"}
    if where == "setting":  # a class-typed argument jsonargparse would resolve by importing its module
        hparams = {"mode": "full", "optimizer": {"class_path": "shared_module.Model"}}
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": hparams}, tmp_path / "x.ckpt")
    args = tiny_args(tiny_llama, tmp_path / "runs", "--ckpt_path", str(tmp_path / "x.ckpt"))
    line = one_error_line(["test", *args], capsys)
    assert ("names the class 'shared_module.Model'" if where == "class path" else "unexpected model settings") in line
    assert not marker.exists()


def test_slot_select_traces_and_dynamics_refuse_recorded_remote_code(attack, tiny_llama, tmp_path, capsys):
    pool = REPO / "data/dynamics/pool.json"
    slot = ["test", "--config", str(REPO / "configs/slot.yaml"), "--model.init_args.backbone.name", str(tiny_llama),
            "--data.test_limit", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "slot")]  # fmt: skip
    for checkpoint in (attack["checkpoint"], attack["export"]):
        line = one_error_line([*slot, "--model.init_args.checkpoint", str(checkpoint)], capsys)
        assert REFUSED_REMOTE_CODE in line
        candidates = tmp_path / "candidates.jsonl"
        candidates.write_text(json.dumps({"question": "1 + 1?", "completions": ["2", "3"], "answer": "2"}) + "\n")
        line = one_error_line(
            ["select", "--candidates", str(candidates), "--checkpoint", str(checkpoint), "--model.name",
             str(tiny_llama), "--output_dir", str(tmp_path / "select")], capsys,
        )  # fmt: skip
        assert REFUSED_REMOTE_CODE in line
        line = one_error_line(
            ["traces", "--output", str(tmp_path / "t.jsonl"), "--checkpoint", str(checkpoint), "--model.name",
             str(tiny_llama), "--limit", "2"], capsys,
        )  # fmt: skip
        assert REFUSED_REMOTE_CODE in line
    line = one_error_line(["dynamics", "--folder", str(attack["run"]), "--pool", str(pool), "--model.name",
                           str(tiny_llama)], capsys)  # fmt: skip
    assert REFUSED_REMOTE_CODE in line
    line = one_error_line(["dynamics", "--folder", str(attack["run"]), "--pool", str(pool)], capsys)
    assert REFUSED_REMOTE_CODE in line
    assert not attack["marker"].exists()
    assert not any((tmp_path / name).exists() for name in ("slot", "select", "t.jsonl"))


def test_dynamics_never_takes_its_base_model_from_a_file(tiny_llama, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_llama, run / "epoch_0")
    (run / "epoch_0/training_info.json").write_text(json.dumps({"global_step": 3, "backbone": {"name": "org/other"}}))
    line = one_error_line(["dynamics", "--folder", str(run), "--pool", str(REPO / "data/dynamics/pool.json")], capsys)
    assert "was trained on 'org/other': give its base model with --model.name" in line


def test_folder_code_runs_only_when_the_user_trusts_it(attack, tiny_llama):
    """A folder whose tokenizer and model name their own code: one line without trust_remote_code (never a prompt),
    and the code does run once the user sets it (so the refusal is what kept it from running)."""
    shared = attack["evil"].parent / "shared-export"
    shutil.copytree(attack["evil"], shared)
    with pytest.raises(UserInputError, match=NEEDS_OWN_CODE):
        load_trained(ModelSpec(name=str(tiny_llama)), shared)
    with pytest.raises(UserInputError, match=NEEDS_OWN_CODE):
        load_trained(ModelSpec(name=str(attack["evil"])))
    assert not attack["marker"].exists()
    try:
        load_trained(ModelSpec(name=str(tiny_llama), trust_remote_code=True), shared)
    except Exception:  # noqa: BLE001 - the toy classes need not load; what matters is that their module ran
        pass
    assert attack["marker"].read_text() == "the file ran"


def test_a_recorded_backbone_name_warns_and_the_users_is_used(tiny_llama, tmp_path, caplog):
    export = tmp_path / "epoch_0"
    shutil.copytree(tiny_llama, export)
    (export / "training_info.json").write_text(json.dumps({"global_step": 4, "backbone": {"name": "org/elsewhere"}}))
    trained = load_trained(ModelSpec(name=str(tiny_llama)), export)
    assert trained.step == 4
    assert "backbone.name = 'org/elsewhere'; using yours" in caplog.text


# Names that become paths.


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): (path.read_bytes() if path.is_file() else None) for path in root.rglob("*")}


@pytest.mark.parametrize(
    ("key", "value"),
    [("version", ".."), ("version", "../victim/important"), ("name", "../x"), ("name", "/abs"), ("version", "a/b")],
)
def test_logger_names_that_escape_the_save_dir_are_refused(key, value, tiny_llama, tmp_path, capsys):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim/important").write_text("a user's file")
    (tmp_path / "runs/other_experiment/version_0").mkdir(parents=True)
    (tmp_path / "runs/other_experiment/version_0/last.ckpt").write_text("another run")
    before = tree(tmp_path)
    args = tiny_args(
        tiny_llama, tmp_path / "runs", f"--trainer.logger.init_args.{key}", value, "--overwrite_run", "true"
    )
    line = one_error_line(["fit", *args, "--trainer.max_steps", "1"], capsys)
    assert line.startswith(f"error: trainer.logger.init_args.{key}: {value!r} is not a plain name")
    assert tree(tmp_path) == before


def test_overwrite_run_removes_only_inside_the_save_dir(tmp_path, monkeypatch):
    (tmp_path / "save/exp/version_0").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    assert check_inside(tmp_path / "save/exp/version_0", tmp_path / "save", "x") == tmp_path / "save/exp/version_0"
    for path in (tmp_path / "save", tmp_path / "outside", tmp_path / "save/../outside"):
        with pytest.raises(UserInputError, match="is not inside"):
            check_inside(path, tmp_path / "save", "--overwrite_run")
    os.symlink(tmp_path / "outside", tmp_path / "save/link")  # a link inside that leads out
    with pytest.raises(UserInputError, match="is not inside"):
        check_inside(tmp_path / "save/link", tmp_path / "save", "--overwrite_run")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "/abs", "tab\there", "nul\x00"])
def test_check_name_refuses_what_is_not_one_plain_name(name):
    with pytest.raises(UserInputError, match="is not a plain name"):
        check_name(name, "what")


@pytest.mark.parametrize("name", ["version_0", "log_times_5_lr_0.1", "run-1.b", "epoch0-step2", "é"])
def test_check_name_keeps_plain_names(name):
    assert check_name(name, "what") == name


def test_compare_refuses_arm_names_that_are_paths(tmp_path, capsys):
    folder = tmp_path / "arms"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"arms": {"../../secret": {}, "log_times_0_lr_0.1": {}}}))
    line = one_error_line(["compare", str(folder), "--output_dir", str(tmp_path / "out")], capsys)
    assert "arm: '../../secret' is not a plain name" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("runs", "extra", "expected"),
    [
        ([{"name": "..", "configs": ["C"]}], [], "run name '..' may only hold"),
        ([{"name": "r", "configs": ["C"]}], ["--slurm.environment", '{"A B": "1"}'], "key 'A B' is not a shell"),
        ([{"name": "r", "configs": ["C"]}], ["--slurm.environment", '{"X;touch /tmp/p": "1"}'], "is not a shell"),
        ([{"name": "r", "configs": ["C"]}], ["--slurm.account", "lab\nrm -rf ~"], "slurm.account 'lab\\nrm -rf ~'"),
    ],
)
def test_scaffold_refuses_names_and_values_that_escape(runs, extra, expected, tmp_path, capsys):
    config = str(REPO / "configs/planning_gsm8k.yaml")
    runs = [{**run, "configs": [config]} for run in runs]
    experiment = tmp_path / "lab" / "experiment"
    args = ["scaffold", "--experiment_dir", str(experiment), "--runs", json.dumps(runs), "--slurm.setup", "[]"]
    line = one_error_line([*args, *extra], capsys)
    assert expected in line
    assert not (tmp_path / "lab").exists()


def test_scaffold_quotes_environment_values(tmp_path):
    runs = [{"name": "r", "configs": [str(REPO / "configs/planning_gsm8k.yaml")]}]
    environment = {"HF_HOME": "/scratch/my hf; touch /tmp/pwned"}
    main(["scaffold", "--experiment_dir", str(tmp_path / "exp"), "--runs", json.dumps(runs), "--slurm.setup", "[]",
          "--slurm.environment", json.dumps(environment)])  # fmt: skip
    script = (tmp_path / "exp/r/finetune.slurm").read_text()
    assert "export HF_HOME='/scratch/my hf; touch /tmp/pwned'\n" in script


@pytest.mark.slow
def test_no_kernel_code_is_fetched_from_the_hub_unless_asked():
    """bitsandbytes would download and load a compiled kernel from the hub at import (AVX512-BF16 CPUs, `kernels`
    installed): our entry points make `import kernels` fail, so it never can; the user may allow it."""
    import subprocess
    import sys

    probe = (
        "import cli, peft, bitsandbytes\n"
        "try:\n    import kernels\n    print('importable')\nexcept ImportError:\n    print('blocked')"
    )
    blocked = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert blocked.stdout.strip() == "blocked", blocked.stderr[-2000:]
    assert "gemm_4bit_forward" not in blocked.stderr  # and quietly
    environment = {**os.environ, "REASONING_LAB_HUB_KERNELS": "1"}
    allowed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300,
                             env=environment)  # fmt: skip
    installed = any(dist.metadata["Name"] == "kernels" for dist in importlib.metadata.distributions())
    assert allowed.stdout.strip() == ("importable" if installed else "blocked")
