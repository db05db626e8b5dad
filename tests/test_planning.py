"""Planning tokens: step splitting and types on real solutions, targets and eval prompts, prompt-tuning
modes (only the new rows train, tied and untied, oversized embedding matrix), CLI fits, exports, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_main, save_tiny, tiny_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import build_cli
from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from evaluation.generation import GenerationSpec, generate
from lightning_modules.finetune import CausalLMFineTuner
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.examples import TASKS, load_examples
from tasks.planning import PlanningSpec, arithmetic_types, split_steps, tagged_steps
from tasks.prompts import PromptSpec
from tasks.scoring import score_completion
from tasks.step_types import StepTyper

ARITHMETIC = PlanningSpec(method="arithmetic", n_prefix=2, n_special=1)


def test_gsm8k_steps_and_arithmetic_types_match_a_hand_checked_example():
    examples = load_examples(TASKS["gsm8k"], None, "train")
    betty = examples[2]  # "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50. ..."
    steps = split_steps(betty.response, "gsm8k")
    assert steps == [
        "In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.",
        "Betty's grandparents gave her 15 * 2 = $<<15*2=30>>30.",
        "This means, Betty needs 100 - 50 - 30 - 15 = $<<100-50-30-15=5>>5 more.",
    ]
    assert [arithmetic_types(step) for step in steps] == [["/"], ["*"], ["-", "-", "-"]]
    assert ARITHMETIC.render(steps[:1], [["/"]], "5") == (
        "<prefix_0><prefix_1></_0> In the beginning, Betty has only 100 / 2 = $<<100/2=50>>50.\n"
        "<prefix_0><prefix_1><answer_0> The answer is: 5\n"
    )
    # A sentence split on ". " gets its period back; a step without annotation is an assignment.
    steps = split_steps("He has 3 apples. She has 4 apples\n#### 7", "gsm8k")
    assert steps == ["He has 3 apples.", "She has 4 apples."]
    assert arithmetic_types("He has 3 apples.") == ["assignment"]
    # MATH / AQuA carry no annotations: the extended list is searched in the step itself.
    assert arithmetic_types(r"So $x = \frac{3}{4} + \sqrt{2}$ and 5! = 120.", "extended") == ["frac", "+", "sqrt", "!"]
    aqua = load_examples(TASKS["aqua"], None, "test")[1]
    assert not any(step.lower().startswith(("answer", "the answer")) for step in split_steps(aqua.response, "aqua"))


def test_token_layout_is_known_from_the_spec():
    assert PlanningSpec().tokens() == []  # method none: plain chain of thought
    spec = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)
    keys = spec.key_tokens()
    assert list(keys) == ["prefix", "answer", "assignment", "+", "-", "*", "/"]
    assert keys["prefix"] == ["<prefix_0>", "<prefix_1>", "<prefix_2>"] and keys["+"] == ["<+_0>", "<+_1>"]
    assert PlanningSpec(method="arithmetic", n_prefix=6).tokens() == [f"<prefix_{i}>" for i in range(6)]
    assert list(PlanningSpec(method="kmeans", n_special=1, num_types=3).key_tokens())[-3:] == ["0", "1", "2"]
    assert PlanningSpec(method="memory-reason", n_special=1).key_tokens()["memory"] == ["<memory_0>"]


def test_memory_reason_tags_become_keys_and_bad_tags_are_named():
    steps, types = tagged_steps("[rag]: Paris is in France.\n[memory]: France is in Europe.\n[reason]: So yes.", "x")
    assert steps == ["Paris is in France.", "France is in Europe.", "So yes."]
    assert types == [["memory"], ["memory"], ["reason"]]
    with pytest.raises(UserInputError, match=r"where: step 2 has no \[rag\]/\[memory\]/\[reason\] tag"):
        tagged_steps("[rag]: a.\nb.", "where")
    with pytest.raises(UserInputError, match=r"unknown type key '\[calc\]'"):
        tagged_steps("[calc]: 1 + 1 = 2.", "where")


def test_bad_planning_settings_are_one_clear_error(tiny_llama):
    with pytest.raises(UserInputError, match="unknown selection method 'clusters'.*arithmetic"):
        PlanningSpec(method="clusters")
    with pytest.raises(UserInputError, match="n_prefix = n_special = 0"):
        PlanningSpec(method="arithmetic", n_prefix=0, n_special=0)
    with pytest.raises(UserInputError, match="mode=prompt-tuning trains planning tokens"):
        CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="prompt-tuning")
    with pytest.raises(UserInputError, match="use lora\\+prompt-tuning"):
        CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora", planning=ARITHMETIC)


def test_tagged_dataset_with_an_untagged_step_names_file_and_example(tiny_llama, tmp_path):
    rows = [{"question": f"q{i}", "steps": ["[rag]: a.", "[reason]: b."], "answer": True} for i in range(6)]
    rows[4]["steps"][1] = "b without a tag."
    path = tmp_path / "tagged.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    module = CausalLMFineTuner(
        backbone=ModelSpec(name=str(tiny_llama)),
        mode="lora+prompt-tuning",
        planning=PlanningSpec(method="memory-reason", n_prefix=1, n_special=1),
    )
    data = ReasoningDataModule(
        task="strategyqa", train_path=str(path), val_size=1, tokenizer=module.tokenizer, planning=module.planning
    )
    with pytest.raises(UserInputError, match=r"tagged\.jsonl example 'train-4': step 2 has no"):
        data.setup("fit")


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_eval_prompt_is_the_training_input_up_to_the_prefix_tokens(tiny_llama, style):
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=ARITHMETIC)
    data = ReasoningDataModule(
        prompt=PromptSpec(style=style), val_size=4, train_limit=4, tokenizer=module.tokenizer, planning=module.planning
    )
    data.setup("fit")
    prefix_ids = module.tokenizer.convert_tokens_to_ids(["<prefix_0>", "<prefix_1>"])
    for row in data.splits["val"]:
        prompt, inputs, labels = row["prompt_ids"], row["input_ids"], row["labels"]
        assert inputs[: len(prompt)] == prompt and prompt[-2:] == prefix_ids  # the model generates the types
        trained = [token for token in labels if token != -100]
        assert trained[-1] == module.tokenizer.eos_token_id
        text = module.tokenizer.decode(trained)
        assert text.count("<answer_0>") == 1 and "The answer is: " + row["answer"] in text
        assert data.gold_types["validation"][row["id"]]["prefix"] == text.count("<prefix_0>")
    # Planning tokens never reach answer extraction: "<answer_0>" holds no number.
    completion = module.planning.remove_tokens("<prefix_0><answer_0> The answer is:")
    assert score_completion("gsm8k", completion, "0") == (None, False)


def train_a_few_steps(module: CausalLMFineTuner, steps: int = 3) -> None:
    module.configure_model()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([module.tokenizer.convert_tokens_to_ids(module.planning.tokens()) + [5, 17, 42, 99]])
    for _ in range(steps):
        loss = module.model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def tiny_qwen2_oversized(tmp_path_factory) -> Path:
    """An untied Qwen2 whose embedding matrix (576 rows) is larger than its vocabulary (512), like Qwen2.5."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2-big"), "qwen2", tie_word_embeddings=False, vocab_size=576)


@pytest.mark.parametrize("kind", ["llama", "qwen2_oversized"])
def test_prompt_tuning_changes_only_the_new_rows(kind, tiny_llama, tiny_qwen2_oversized):
    folder = tiny_llama if kind == "llama" else tiny_qwen2_oversized
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(folder)), mode="prompt-tuning", planning=ARITHMETIC)
    new_ids = module.tokenizer.convert_tokens_to_ids(ARITHMETIC.tokens())
    assert new_ids == list(range(512, 512 + len(new_ids)))  # sized from len(tokenizer), not from the matrix
    before = AutoModelForCausalLM.from_pretrained(folder)
    train_a_few_steps(module)
    after = module.model.merge_and_unload()
    rows = max(512 + len(new_ids), before.get_input_embeddings().weight.shape[0])
    assert after.get_input_embeddings().weight.shape[0] == rows  # 576 rows stay 576 for the oversized Qwen2
    changed = torch.zeros(rows, dtype=torch.bool)
    changed[new_ids] = True
    after_state, matrices = after.state_dict(), ("embed_tokens.weight", "lm_head.weight")
    for name, value in before.state_dict().items():
        if not name.endswith(matrices):
            assert torch.equal(after_state[name], value), name  # every other parameter bitwise equal
            continue
        trained = after_state[name]
        old = min(value.shape[0], rows)
        assert torch.equal(trained[:old][~changed[:old]], value[:old][~changed[:old]]), name
        assert not torch.equal(trained[new_ids], torch.zeros_like(trained[new_ids]))
    assert not torch.equal(after.get_input_embeddings().weight[new_ids], before_rows(module, folder, new_ids))


def before_rows(module: CausalLMFineTuner, folder: Path, new_ids: list[int]) -> torch.Tensor:
    """The initial rows of the new tokens: each key's word embedding (mean over its pieces)."""
    fresh = CausalLMFineTuner(backbone=ModelSpec(name=str(folder)), mode="prompt-tuning", planning=ARITHMETIC)
    fresh.configure_model()
    embedding = fresh.model.merge_and_unload().get_input_embeddings().weight
    pieces = fresh.tokenizer("prefix", add_special_tokens=False).input_ids
    base = AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight
    torch.testing.assert_close(embedding[new_ids[0]], base[pieces].mean(0))  # <prefix_0> starts at "prefix"
    return embedding[new_ids].detach()


def test_checkpoint_with_other_planning_tokens_is_rejected_by_name(tiny_llama, tmp_path):
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=ARITHMETIC)
    checkpoint = {"state_dict": {}, "planning_tokens": ARITHMETIC.key_tokens()}
    other = CausalLMFineTuner(
        backbone=ModelSpec(name=str(tiny_llama)),
        mode="lora+prompt-tuning",
        planning=PlanningSpec(method="arithmetic", n_prefix=2, n_special=1, operators="extended"),
    )
    with pytest.raises(UserInputError, match="planning tokens differ.*sqrt"):
        other.on_load_checkpoint(checkpoint)
    module.configure_model()
    module.on_save_checkpoint(saved := {"state_dict": {}})
    assert saved["planning_tokens"]["/"] == ["</_0>"]


@pytest.mark.slow
def test_prompt_tuning_fit_export_reload_gives_the_same_generations(tiny_qwen2_oversized, tmp_path):
    """Untied lm_head, oversized matrix: fit (prompt-tuning) -> merged export -> reload -> same greedy text."""
    args = tiny_args(
        tiny_qwen2_oversized, tmp_path, "--model.init_args.mode", "prompt-tuning", "--data.train_limit", "8",
        "--model.init_args.optimizer.init_args.lr", "0.05",
    )  # fmt: skip
    assert run_main(["fit", *args]) == 0
    run = tmp_path / "planning_gsm8k/version_0"
    report = json.loads((run / "planning/val_step2.json").read_text())
    assert report["questions"] == 4 and report["per_question"]["prefix"]["gold"] >= 2
    exported = AutoModelForCausalLM.from_pretrained(run / "epoch_0").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "epoch_0")
    assert len(tokenizer) == 527 and tokenizer.convert_tokens_to_ids("<prefix_0>") == 512
    checkpoint = str(run / "checkpoints/last.ckpt")
    from_checkpoint = load_trained(ModelSpec(name=str(tiny_qwen2_oversized)), checkpoint).model
    prompt = tokenizer("Question: 2+3?\nAnswer: <prefix_0><prefix_1><prefix_2>", return_tensors="pt")
    spec = GenerationSpec(max_new_tokens=12)
    models = (exported, from_checkpoint.eval())
    texts = [generate(m, tokenizer, prompt.input_ids, prompt.attention_mask, spec) for m in models]
    assert texts[0] == texts[1]
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_oversized)
    assert not torch.equal(exported.lm_head.weight[512:527], base.lm_head.weight[512:527])  # lm_head rows trained
    assert torch.equal(exported.lm_head.weight[:512], base.lm_head.weight[:512])


@pytest.mark.slow
def test_memory_reason_config_fits_on_the_fixture(tiny_llama, tmp_path):
    args = [
        "--config", str(REPO / "configs/memory_reason_strategyqa.yaml"),
        "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--model.init_args.backbone.name", str(tiny_llama), "--data.max_length", "1024",
        "--model.init_args.generation.max_new_tokens", "8", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--data.test_limit", "3",
        "--model.init_args.planning.n_prefix", "2", "--model.init_args.planning.n_special", "4",  # the config's own
    ]  # fmt: skip
    assert run_main(["fit", *args]) == 0
    run = tmp_path / "memory_reason_strategyqa/version_0"
    report = json.loads((run / "planning/val_step4.json").read_text())
    assert report["questions"] == 8 and report["per_question"]["memory"]["gold"] > 0
    assert report["per_question"]["reason"]["gold"] > 0
    tokenizer = AutoTokenizer.from_pretrained(run / "epoch_0")
    assert tokenizer.convert_tokens_to_ids("<reason_3>") > tokenizer.convert_tokens_to_ids("<memory_0>") >= 512
    assert run_main(["test", *args, "--ckpt_path", "last"]) == 0
    assert json.loads((run / "planning/test_step4.json").read_text())["questions"] == 3


MODE_OVERLAYS = sorted((REPO / "configs/planning_modes").glob("*.yaml"))


@pytest.mark.parametrize("overlay", MODE_OVERLAYS, ids=lambda p: p.name)
def test_every_planning_mode_overlay_stacks_and_instantiates(overlay, tiny_llama, tmp_path):
    cli = build_cli(["--config", str(REPO / "configs/planning_gsm8k.yaml"), "--config", str(overlay),
                     "--model.init_args.backbone.name", str(tiny_llama),
                     "--trainer.logger.init_args.save_dir", str(tmp_path)], run=False)  # fmt: skip
    expected = {"full": "full", "lora_cot": "lora", "prompt_tuning": "prompt-tuning"}.get(overlay.stem)
    assert cli.model.mode == (expected or "lora+prompt-tuning")
    assert cli.datamodule.planning is cli.model.planning  # linked from the model
    assert cli.trainer.logger.name != "planning_gsm8k"  # each variant logs under its own name
    if overlay.stem in ("kmeans", "vae"):
        assert cli.model.planning.method == overlay.stem and cli.model.planning.embedding_model == str(tiny_llama)


@pytest.mark.slow
def test_aqua_config_with_vae_types_fits_and_tests_from_its_checkpoint(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("REASONING_LAB_CACHE", str(tmp_path / "cache"))
    args = [
        "--config", str(REPO / "configs/planning_aqua.yaml"), "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--config", str(REPO / "configs/planning_modes/vae.yaml"),
        "--model.init_args.backbone.name", str(tiny_llama), "--data.train_path", str(REPO / "data/aqua/test.jsonl"),
        "--data.train_limit", "8", "--data.val_size", "2", "--data.test_limit", "2", "--data.max_length", "2048",
        "--model.init_args.planning.num_types", "3", "--model.init_args.planning.vae_epochs", "2",
        "--model.init_args.planning.n_special", "2",  # the config's own (the CPU preset trains one per type)
        "--model.init_args.generation.max_new_tokens", "8", "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert run_main(["fit", *args]) == 0
    run = tmp_path / "planning_vae/version_0"
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["ReasoningDataModule"]["planning_typer"]  # the fitted VAE is saved with the run
    assert checkpoint["planning_tokens"]["2"] == ["<2_0>", "<2_1>"]
    monkeypatch.setenv("REASONING_LAB_CACHE", str(tmp_path / "empty-cache"))  # test reuses the checkpoint's VAE...

    def refit(*args, **kwargs):
        raise AssertionError("the step VAE was fitted again")

    monkeypatch.setattr(StepTyper, "fit", refit)  # ...and fits nothing
    assert run_main(["test", *args, "--ckpt_path", "last"]) == 0
    report = json.loads((run / "planning/test_step2.json").read_text())
    assert report["questions"] == 2 and sum(report["per_question"][str(k)]["gold"] for k in range(3)) > 0


def test_unknown_selection_method_on_the_command_line_is_one_line(tiny_llama, tmp_path, capsys):
    code = run_main(["fit", *tiny_args(tiny_llama, tmp_path, "--model.init_args.planning.method", "clusters")])
    err = capsys.readouterr().err
    assert code == 2 and "model.planning.method: unknown selection method 'clusters'" in err
    assert "Traceback" not in err
