"""The CLI end to end on tiny models: configs, fit -> checkpoint -> resume -> test, exports, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, error_lines, read_jsonl, run_dir, run_main, tiny_args, trainable_state
from peft import PeftModel
from scipy.stats import binomtest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import build_cli
from core.checkpoint_file import last_finite_checkpoint
from core.errors import UserInputError
from evaluation.generation import GenerationSpec, generate
from lightning_modules.finetune import CausalLMFineTuner
from models.adapters import LoraSpec
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.planning import PlanningSpec

COMMAND_CONFIGS = {"calibrate.yaml"}  # settings of companion commands, tested with their command
EXPERIMENT_CONFIGS = sorted(path for path in (REPO / "configs").glob("*.yaml") if path.name not in COMMAND_CONFIGS)
PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)  # configs/planning_gsm8k.yaml's
PRESETS = sorted((REPO / "configs/presets").glob("*.yaml"))


@pytest.mark.parametrize("config", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_experiment_config_instantiates(config, tiny_llama, tmp_path):
    cli = build_cli(["--config", str(config), "--model.init_args.backbone.name", str(tiny_llama),
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)  # fmt: skip
    assert cli.model.tokenizer is cli.datamodule.tokenizer  # the link from the model to the datamodule
    assert cli.trainer.logger.name == config.stem  # every experiment logs under its own name


DDP = {"class_path": "lightning.pytorch.strategies.DDPStrategy", "find_unused_parameters": False}
FSDP = {"class_path": "lightning_modules.strategies.FullyShardedStrategy"}
PRESET_SETTINGS = {  # what each preset sets over configs/planning_gsm8k.yaml (read from the files by hand)
    "cpu_demo.yaml": dict(accelerator="cpu", devices=1, precision="32-true", strategy="auto",
                          mode="lora+prompt-tuning", quantization=None, dtype="float32", gradient_checkpointing=False),
    "gpu_ddp.yaml": dict(accelerator="gpu", devices=-1, precision="bf16-mixed", strategy=DDP,
                         mode="lora+prompt-tuning", quantization=None, dtype="float32", gradient_checkpointing=False),
    "gpu_fsdp.yaml": dict(accelerator="gpu", devices=-1, precision="bf16-true", strategy=FSDP,
                          mode="lora+prompt-tuning", quantization=None, dtype="bfloat16", gradient_checkpointing=False),
    "qlora.yaml": dict(accelerator="gpu", devices=1, precision="bf16-mixed", strategy="auto",
                       mode="qlora+prompt-tuning", quantization="nf4", dtype="bfloat16", gradient_checkpointing=True),
}  # fmt: skip


def preset_settings(config: dict) -> dict:
    """The settings a preset may change, from a parsed (`--print_config`) config."""
    trainer, model, backbone = config["trainer"], config["model"]["init_args"], config["model"]["init_args"]["backbone"]
    strategy = trainer["strategy"]
    if isinstance(strategy, dict):  # a class: its path and the arguments a preset sets
        arguments = strategy.get("init_args", {})
        strategy = {"class_path": strategy["class_path"]} | {key: arguments[key] for key in DDP if key in arguments}
    return dict(accelerator=trainer["accelerator"], devices=trainer["devices"], precision=trainer["precision"],
                strategy=strategy, mode=model["mode"], quantization=backbone["quantization"], dtype=backbone["dtype"],
                gradient_checkpointing=backbone["gradient_checkpointing"])  # fmt: skip


def test_every_preset_is_in_the_table():
    assert {path.name for path in PRESETS} == set(PRESET_SETTINGS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_stacks_sets_what_it_says_and_instantiates(preset, tiny_llama, tmp_path, capsys):
    args = ["--config", str(REPO / "configs/planning_gsm8k.yaml"), "--config", str(preset),
            "--model.init_args.backbone.name", str(tiny_llama),
            "--trainer.logger.init_args.save_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:  # every key and class of the stack validates
        build_cli(["fit", *args, "--print_config"])
    assert exit_.value.code == 0
    assert preset_settings(yaml.safe_load(capsys.readouterr().out)) == PRESET_SETTINGS[preset.name]
    if not torch.cuda.is_available():  # GPU presets then instantiate with CPU trainer settings
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                 "--trainer.strategy", "auto"]  # fmt: skip
    cli = build_cli(args, run=False)
    expected = PRESET_SETTINGS[preset.name]
    assert cli.model.mode == expected["mode"]
    assert (cli.model.backbone.quantization, cli.model.backbone.dtype) == (expected["quantization"], expected["dtype"])


def test_print_config_works_for_the_main_config(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_cli(["fit", "--config", str(REPO / "configs/planning_gsm8k.yaml"), "--print_config"])
    assert exit_.value.code == 0
    assert "CausalLMFineTuner" in capsys.readouterr().out


def test_config_typo_is_one_clear_error(tiny_llama, tmp_path, capsys):
    code = run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--data.batch_sise", "4")])
    assert code == 2
    assert "batch_sise" in capsys.readouterr().err


def test_unknown_model_is_one_line(tmp_path, capsys):
    code = run_main(["fit", *tiny_args(Path("no-such-model"), tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown model 'no-such-model'" in err and "smollm2-135m-instruct" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_fit_checkpoint_resume_test_and_export(tiny_llama, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(["fit", *tiny_args(tiny_llama, straight, "--trainer.max_epochs", "2")]) == 0
    crash = '{"class_path": "helpers.CrashAtStep", "init_args": {"step": 5}}'
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_main(["fit", *tiny_args(tiny_llama, resumed, "--trainer.max_epochs", "2", f"--trainer.callbacks+={crash}")])
    assert run_main(["fit", *tiny_args(tiny_llama, resumed, "--trainer.max_epochs", "2", "--ckpt_path", "last")]) == 0

    # Resumed in place (same run directory), with exactly the weights of the uninterrupted run.
    assert not run_dir(resumed, 1).exists()
    expected = trainable_state(run_dir(straight) / "checkpoints/last.ckpt")
    actual = trainable_state(run_dir(resumed) / "checkpoints/last.ckpt")
    assert expected.keys() == actual.keys() and all("lora_" in k or "trainable_tokens" in k for k in expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)

    # Checkpoints hold only the trainable weights.
    n_trainable = sum(v.numel() for v in expected.values())
    assert n_trainable < 0.5 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())

    # 0-indexed epoch exports load unchanged and compute what the trained model computes.
    run = run_dir(resumed)
    assert sorted(p.name for p in run.glob("epoch_*")) == ["epoch_0", "epoch_1"]
    exported = AutoModelForCausalLM.from_pretrained(run / "epoch_1").eval()
    assert not list(run.glob("epoch_1/*.bin")) and (run / "epoch_1/model.safetensors").is_file()
    module = build_module_from(tiny_llama, run / "checkpoints/last.ckpt")
    ids = torch.tensor([[5, 17, 42, 99, 3, 512, 513, 514, 520]])  # ending in planning tokens
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, module.model(ids).logits, rtol=1e-4, atol=1e-5)
    # ...and generate the same text from a prompt ending in the planning prefix tokens (tokenizer from the export).
    tokenizer = AutoTokenizer.from_pretrained(run / "epoch_1")
    prompt = tokenizer("Question: 2+3?\nAnswer: <prefix_0><prefix_1><prefix_2>", return_tensors="pt")
    spec = GenerationSpec(max_new_tokens=12)
    texts = [generate(m, tokenizer, prompt.input_ids, prompt.attention_mask, spec) for m in (exported, module.model)]
    assert texts[0] == texts[1]

    # test on the checkpoint writes per-question samples named after the checkpoint's step.
    assert run_main(["test", *tiny_args(tiny_llama, resumed, "--ckpt_path", "last", "--data.test_limit", "4")]) == 0
    samples = list((run / "samples").glob("test_step8.jsonl"))
    assert samples and len(samples[0].read_text().splitlines()) == 4
    correct = sum(json.loads(line)["correct"] for line in samples[0].read_text().splitlines())
    wilson = binomtest(correct, 4).proportion_ci(method="wilson")
    summary = json.loads((run / "samples/test_step8_summary.json").read_text())
    assert summary["accuracy"] == correct / 4 and summary["accuracy_ci95"] == pytest.approx([wilson.low, wilson.high])
    text_tags = EventAccumulator(str(run), size_guidance={"tensors": 0}).Reload().Tags()["tensors"]
    assert {"val/summary/text_summary", "test/summary/text_summary"} <= set(text_tags)


def build_module_from(model_folder: Path, checkpoint: Path) -> CausalLMFineTuner:
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=True)["hyper_parameters"]
    planning = PlanningSpec(**hparams["planning"])
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(model_folder)), mode=hparams["mode"], planning=planning)
    module.configure_model()
    module.load_state_dict(trainable_state(checkpoint), strict=False)
    return module.eval()


@pytest.mark.slow
def test_adapter_only_export_loads_with_peft(tiny_llama, tmp_path):
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--export.adapter_only", "true")]) == 0
    export = run_dir(tmp_path) / "epoch_0"
    assert (export / "adapter_model.safetensors").is_file() and (export / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(export)))  # the planning tokens' rows
    model = PeftModel.from_pretrained(base, export).eval()
    module = build_module_from(tiny_llama, run_dir(tmp_path) / "checkpoints/last.ckpt")
    merged = load_trained(ModelSpec(name=str(tiny_llama)), str(export)).model  # resizes the base itself
    ids = torch.tensor([[5, 17, 42, 99, 3, 512, 513, 514, 520]])  # ending in planning tokens
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model(ids).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, module.model(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_finetuning_of_untied_qwen2(tiny_qwen2, tmp_path):
    args = tiny_args(tiny_qwen2, tmp_path, "--model.init_args.mode", "full", "--data.train_limit", "8")
    assert run_main(["fit", *args]) == 0
    state = trainable_state(run_dir(tmp_path) / "checkpoints/last.ckpt")
    assert any(key.endswith("lm_head.weight") for key in state) and any("embed_tokens" in key for key in state)
    before = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    after = AutoModelForCausalLM.from_pretrained(run_dir(tmp_path) / "epoch_0")
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)


@pytest.mark.slow
def test_checkpoint_that_does_not_fit_the_model_is_rejected(tiny_llama, tmp_path):
    """`cli.py --ckpt_path` rebuilds the model from the checkpoint's own settings (LightningCLI re-applies
    its hparams); a checkpoint loaded into a module of another mode or model still fails clearly."""
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--data.train_limit", "8")]) == 0
    checkpoint = torch.load(run_dir(tmp_path) / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    full = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="full", planning=PLANNING)
    full.configure_model()
    with pytest.raises(UserInputError, match="does not match this model"):
        full.on_load_checkpoint(checkpoint)
    other_rank = CausalLMFineTuner(
        backbone=ModelSpec(name=str(tiny_llama)),
        mode="lora+prompt-tuning",
        lora=LoraSpec(target_modules=["q_proj"]),
        planning=PLANNING,
    )
    other_rank.configure_model()
    with pytest.raises(UserInputError, match="does not match this model"):
        other_rank.on_load_checkpoint(checkpoint)


@pytest.mark.slow
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tiny_llama, tmp_path, capsys):
    poison = '{"class_path": "helpers.PoisonWeightsAtStep", "init_args": {"step": 6}}'
    code = run_main(
        ["fit", *tiny_args(tiny_llama, tmp_path, "--trainer.max_epochs", "3", f"--trainer.callbacks+={poison}")]
    )
    assert code == 2
    (line,) = error_lines(capsys)
    prefix = "error: non-finite training loss (nan) at step 6: training stopped; the last checkpoint before step 6"
    assert line.startswith(f"{prefix}, with finite weights: ") and line.endswith(" (step 4)")
    good = Path(line.removeprefix(f"{prefix}, with finite weights: ").removesuffix(" (step 4)"))
    assert good.parent == run_dir(tmp_path) / "checkpoints"  # epoch0-step4.ckpt or best-epoch0-step4.ckpt
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


def test_last_finite_checkpoint_passes_over_bad_later_and_unreadable_files(tmp_path):
    def save(name: str, step: int, value: float) -> Path:
        torch.save({"global_step": step, "state_dict": {"w": torch.full((2,), value)}}, tmp_path / name)
        return tmp_path / name

    assert last_finite_checkpoint([tmp_path], 5) is None
    good = save("a.ckpt", 2, 1.0)
    for name, step, value in (("b.ckpt", 3, float("nan")), ("c.ckpt", 4, float("inf")), ("d.ckpt", 5, 1.0)):
        save(name, step, value)  # non-finite, or not before step 5
    (tmp_path / "e.ckpt").write_bytes(good.read_bytes()[:100])  # truncated
    (tmp_path / "last.ckpt").symlink_to(good)
    assert last_finite_checkpoint([tmp_path], 5) == (good.resolve(), 2)
    assert last_finite_checkpoint([tmp_path], 2) is None


@pytest.mark.slow
def test_a_learning_rate_that_blows_up_the_weights_stops_before_they_are_saved(tiny_llama, tmp_path, capsys):
    """lr 1e6 (0 at step 0, the warmup): the update of step 1 multiplies the weights' norm by ~1e7. Before the
    check, training went on until the loss was NaN at step 3, after checkpoints of steps 2 and 3 holding
    weights of ~1e6, and the message called the last of them good."""
    every_step = json.dumps(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": str(tmp_path / "steps"),
                "filename": "{step}",
                "every_n_train_steps": 1,
                "save_top_k": -1,
            },
        }
    )
    huge = ["--model.init_args.optimizer.init_args.lr", "1e6", "--trainer.max_epochs", "3"]
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, *huge, f"--trainer.callbacks+={every_step}")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: the optimizer step from step 1 to 2 blew up the trainable weights (norm ")
    assert line.endswith(
        "training stopped before they were saved; the last checkpoint before step 2, with finite weights: "
        f"{tmp_path / 'steps/step=1.ckpt'} (step 1)"
    )
    (saved,) = (tmp_path / "steps").iterdir()  # only step 1's: the blown-up weights never reach a checkpoint
    weights = torch.load(saved, map_location="cpu", weights_only=True)["state_dict"].values()
    assert max(value.abs().max().item() for value in weights) < 1

    # With the experiment's own checkpoints (at validation, every epoch), nothing was saved before step 2.
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path / "default", *huge)]) == 2
    (line,) = error_lines(capsys)
    assert line.endswith("training stopped before they were saved; no checkpoint was saved before step 2")
    assert not list((tmp_path / "default").rglob("*.ckpt"))


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tiny_llama, tmp_path):
    """2 processes train the same weights (each saves its own), the checkpoint holds them, and the validation
    accuracy logged is the one of the 4 questions (each once) in the samples file."""
    dynamics = '{"class_path": "callbacks.dynamics.LikelihoodDynamics", "init_args": {"types": ["test"]}}'
    weights = json.dumps({"class_path": "helpers.SaveTrainableWeights", "init_args": {"folder": str(tmp_path / "w")}})
    args = tiny_args(tiny_llama, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     f"--trainer.callbacks+={dynamics}", f"--trainer.callbacks+={weights}")  # fmt: skip
    environment = os.environ | {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}"}  # the callback above by class_path
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=600, env=environment)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir(tmp_path)
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "epoch_0/model.safetensors").is_file()
    state = trainable_state(run / "checkpoints/last.ckpt")
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2  # 16 examples / (2 x 4)
    rank0, rank1 = (torch.load(tmp_path / "w" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and state.keys() <= rank0.keys() and state
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0)
    for key in state:
        torch.testing.assert_close(state[key], rank0[key], rtol=0, atol=0)
    rows = read_jsonl(run / "samples/val_step2.jsonl")
    assert sorted(row["id"] for row in rows) == sorted({row["id"] for row in rows}) and len(rows) == 4
    (accuracy,) = EventAccumulator(str(run)).Reload().Scalars("val/accuracy")  # the one validation, at the end
    assert accuracy.value == pytest.approx(sum(row["correct"] for row in rows) / 4)
    summary = json.loads((run / "dynamics/summary.json").read_text())  # rank 0 scored the pool, once per step
    assert summary["steps"] == [0, 2] and list(summary["results_by_type"]) == ["test"]


ALIGNED_PROBE = "import torch; print(all(torch.empty(2**20).data_ptr() % 4096 == 0 for _ in range(8)))"
"""Whether 4 MB tensors are page-aligned: PyTorch's CPU allocator does that only with THP_MEM_ALLOC_ENABLE on."""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PyTorch's huge-page allocation is Linux only")
@pytest.mark.parametrize(
    ("code", "setting", "aligned"),
    [
        (ALIGNED_PROBE, None, "False"),
        ("import cli; " + ALIGNED_PROBE, None, "True"),
        ("import cli; " + ALIGNED_PROBE, "0", "False"),
    ],  # fmt: skip
    ids=["plain torch", "the cli", "the cli, user said 0"],
)
def test_the_cli_allocates_large_tensors_on_huge_pages(code: str, setting: str | None, aligned: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    env |= {"THP_MEM_ALLOC_ENABLE": setting} if setting is not None else {}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == aligned
