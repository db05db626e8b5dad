"""Planning-token rows: distinct initial rows (seeded) on tied and untied models, their own learning rate; the
layout check of generated solutions; what the run summary shows at the end of fit."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from helpers import run_dir, run_main, tiny_args
from transformers import AutoModelForCausalLM

from lightning_modules.finetune import CausalLMFineTuner
from models.loader import load_trained
from models.loading import ModelSpec
from tasks.planning import PlanningSpec

SPEC = {"method": "arithmetic", "n_prefix": 3, "n_special": 2}


def rows_of(module: CausalLMFineTuner, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The current input-embedding and lm_head rows of `ids` as the wrapped model uses them."""
    with torch.no_grad():
        inputs = module.model.get_input_embeddings()(torch.tensor(ids))
        hidden = inputs.shape[1]
        outputs = module.model.get_output_embeddings()(torch.eye(hidden))[:, ids].T  # row i of W = W e_i
    return inputs.clone(), outputs.clone()


def min_distance_within_keys(rows: torch.Tensor, planning: PlanningSpec) -> float:
    index = {token: i for i, token in enumerate(planning.tokens())}
    pairs = [
        (index[a], index[b]) for tokens in planning.key_tokens().values() for a, b in itertools.combinations(tokens, 2)
    ]
    return min(float((rows[a] - rows[b]).norm()) for a, b in pairs)


def build(folder, **settings) -> tuple[CausalLMFineTuner, PlanningSpec, list[int]]:
    planning = PlanningSpec(**SPEC, **settings)
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(folder)), mode="prompt-tuning", planning=planning)
    module.configure_model()
    return module, planning, module.tokenizer.convert_tokens_to_ids(planning.tokens())


def train_on_planning_text(module: CausalLMFineTuner, ids: list[int], lr: float, steps: int) -> torch.Tensor:
    """A few AdamW steps on one text made of planning tokens and ordinary ones; returns the text."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    text = torch.tensor([ids[:5] + [5, 17, 42] + ids[:3] + ids[-2:] + [99, 7]])
    for _ in range(steps):
        module.model(input_ids=text, labels=text).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return text


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_distinct_initial_rows_stay_distinct_and_only_the_new_rows_train(kind, tiny_llama, tiny_qwen2):
    """Tied Llama and untied Qwen2: every key's first token starts at its word's row, the others at a perturbation
    of ~init_spread x the matrix's entry std per coordinate; after training they are still distinct and only
    the new rows changed."""
    folder = tiny_llama if kind == "llama" else tiny_qwen2
    base = AutoModelForCausalLM.from_pretrained(folder)
    matrices = [base.get_input_embeddings().weight.detach(), base.get_output_embeddings().weight.detach()]
    module, planning, ids = build(folder, init_spread=1.0)
    start = rows_of(module, ids)
    pieces = module.tokenizer("prefix", add_special_tokens=False).input_ids
    position = {token: i for i, token in enumerate(planning.tokens())}
    for matrix, rows in zip(matrices, start, strict=True):
        torch.testing.assert_close(rows[0], matrix[pieces].mean(0))  # <prefix_0>: the row of "prefix"
        scale = float(matrix.std(0).square().sum().sqrt())  # expected norm: per-coordinate std over the vocabulary
        for tokens in planning.key_tokens().values():
            for token in tokens[1:]:
                distance = float((rows[position[token]] - rows[position[tokens[0]]]).norm()) / scale
                assert 0.6 < distance < 1.4, (token, distance)
        assert min_distance_within_keys(rows, planning) > 0.6 * scale
    assert torch.equal(start[0], start[1]) == (kind == "llama")  # tied: one matrix
    if kind == "llama":
        assert torch.equal(rows_of(build(folder, init_spread=1.0)[0], ids)[0], start[0])  # seeded: reproducible
        paper = rows_of(build(folder, init_spread=0.0)[0], ids)[0]
        assert min_distance_within_keys(paper, planning) == 0  # the paper's init: copies of the word's row

    train_on_planning_text(module, ids, lr=1e-3, steps=5)
    trained = rows_of(module, ids)
    for before, after in zip(start, trained, strict=True):
        assert not torch.equal(before, after)
        assert min_distance_within_keys(after, planning) > 0.5 * min_distance_within_keys(before, planning)

    merged = module.model.merge_and_unload()
    new = torch.zeros(merged.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    new[ids] = True
    for matrix, base_matrix, rows in zip(
        (merged.get_input_embeddings().weight, merged.get_output_embeddings().weight), matrices, trained, strict=True
    ):
        assert torch.equal(matrix[~new], base_matrix)  # the old rows are the base's, input and output
        torch.testing.assert_close(matrix[ids], rows)
    state = merged.state_dict()
    for name, value in base.state_dict().items():
        if not name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(state[name], value), name


def test_token_rows_get_their_own_learning_rate(tiny_llama):
    planning = PlanningSpec(**SPEC, token_lr=0.03)
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=planning)
    module.configure_model()
    groups = module.configure_optimizers().param_groups
    rows = {id(p) for n, p in module.named_parameters() if "trainable_tokens_delta" in n}
    assert [group["lr"] for group in groups] == [2e-4, 0.03]
    assert {id(p) for p in groups[1]["params"]} == rows and len(rows) == 1
    lora = {id(p) for n, p in module.named_parameters() if "lora_" in n}
    assert {id(p) for p in groups[0]["params"]} == lora and lora


@pytest.mark.parametrize("n_special", [2, 0])
def test_layout_check_accepts_the_trained_layout_only(n_special):
    planning = PlanningSpec(method="arithmetic", n_prefix=3, n_special=n_special)
    prefix = "<prefix_0><prefix_1><prefix_2>"
    plus, answer = ("<+_0><+_1>", "<answer_0><answer_1>") if n_special else ("", "")
    good = f"{prefix}{plus} She sold 48+24 = <<48+24=72>>72 clips.\n{prefix}{answer} The answer is: 72\n"
    assert planning.follows_layout(good) and planning.follows_layout(good.rstrip())
    two_types = good.replace(plus, plus + plus.replace("+", "*")) if n_special else good
    assert planning.follows_layout(two_types)
    bad = [
        prefix * 20,  # the degenerate run of the issue
        good.replace(" She sold 48+24 = <<48+24=72>>72 clips.", ""),  # planning tokens without step text
        good.split("\n")[0] + "\n",  # no answer line
        good + "Then more text\n",  # text after the answer line
        good.replace("48+24", "48<prefix_1>24"),  # a planning token inside the step text
        good.replace(prefix, "<prefix_0><prefix_2>", 1),  # a prefix token missing
        f"{prefix}{answer} The answer is: 72\n",  # no step
    ]
    if n_special:
        bad.append(good.replace(plus, ""))  # a step without its type tokens
    # a long degenerate generation (what a 1-token-per-key run produced): the old whole-text pattern backtracked
    # exponentially in the number of lines on it and froze fit's validation
    bad.append(f"{prefix}{plus} 15% of $80 = $1.50 * 1.50 = $2.25\n" * 40)
    for text in bad:
        assert not planning.follows_layout(text), text
    assert not PlanningSpec().follows_layout(good)  # no planning tokens: no layout


@pytest.mark.slow
def test_run_summary_shows_loss_before_and_after_layout_share_and_samples(tiny_llama, tmp_path, capsys):
    """The fit's summary: the step-0 validation loss equals `validate` of the untrained model (an independent
    Lightning validation pass), the layout count matches the sample file, and the paths exist."""
    extra = ["--model.init_args.planning.init_spread", "1.0", "--export.enabled", "false"]
    assert run_main(["validate", *tiny_args(tiny_llama, tmp_path / "validate", *extra)]) == 0
    validate_output = capsys.readouterr().out
    untrained = float(re.search(r"val/loss\s*│\s*([0-9.]+)", validate_output).group(1))
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path / "fit", *extra)]) == 0
    summary = capsys.readouterr().out.split("Finished.")[-1]
    start, end = re.search(r"validation loss:\s+([0-9.]+) at step 0 -> ([0-9.]+) at step 4", summary).groups()
    assert float(start) == pytest.approx(untrained, abs=1e-4)
    samples = re.search(r"val samples:\s+(\S+)", summary).group(1)
    assert samples.endswith("samples/val_step4.jsonl")
    completions = [json.loads(line)["completion"] for line in open(samples)]
    followed, total, report = re.search(r"planning layout:\s+(\d+)/(\d+) .*: (\S+)", summary).groups()
    assert int(total) == len(completions) == 4
    planning = PlanningSpec(**SPEC, init_spread=1.0)
    assert int(followed) == sum(planning.follows_layout(planning.eval_prefix() + text) for text in completions)
    assert json.loads(open(report).read())["layout_share"] == int(followed) / 4


def test_untie_output_trains_the_output_rows_apart(tiny_llama):
    """planning.untie_output on a tied model: the lm_head becomes its own copy of the embedding, the new tokens'
    input and output rows start equal and train apart, and the old rows stay the base's."""
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    embedding = base.get_input_embeddings().weight.detach()
    planning = PlanningSpec(**SPEC, untie_output=True, init_spread=0.5)
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=planning)
    module.configure_model()
    ids = module.tokenizer.convert_tokens_to_ids(planning.tokens())
    inputs, outputs = rows_of(module, ids)
    assert torch.equal(inputs, outputs)  # same initialisation for both matrices
    train_on_planning_text(module, ids, lr=1e-2, steps=3)
    inputs, outputs = rows_of(module, ids)
    assert not torch.allclose(inputs, outputs)  # trained apart
    merged = module.model.merge_and_unload()
    old = torch.ones(merged.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    old[ids] = False
    for matrix in (merged.get_input_embeddings().weight, merged.get_output_embeddings().weight):
        assert torch.equal(matrix[old], embedding[: int(old.sum())])


@pytest.mark.slow
def test_untied_rows_export_through_epoch_export_and_reload_with_the_trained_logits(tiny_llama, tmp_path):
    """A fit with planning.untie_output: the `epoch_0/` folder that `EpochExport` writes, reloaded by
    `load_trained`, is untied, its new rows trained apart, its old rows the base's, and it gives the logits of the
    model rebuilt from the same run's Lightning checkpoint (which never went through the export folder)."""
    extra = ["--model.init_args.planning.untie_output", "true", "--model.init_args.planning.init_spread", "0.5",
             "--trainer.limit_val_batches", "0"]  # fmt: skip
    assert run_main(["fit", *tiny_args(tiny_llama, tmp_path, *extra)]) == 0
    run = run_dir(tmp_path)
    backbone = ModelSpec(name=str(tiny_llama))
    exported = load_trained(backbone, run / "epoch_0")
    from_checkpoint = load_trained(backbone, run / "checkpoints/last.ckpt").model
    model, tokenizer = exported.model, exported.tokenizer
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert outputs.data_ptr() != inputs.data_ptr()  # untied on disk and after reloading
    ids = tokenizer.convert_tokens_to_ids(PlanningSpec(**SPEC).tokens())
    assert not torch.allclose(inputs[ids], outputs[ids])  # trained apart
    embedding = AutoModelForCausalLM.from_pretrained(tiny_llama).get_input_embeddings().weight
    for matrix in (inputs, outputs):
        torch.testing.assert_close(matrix[: embedding.shape[0]], embedding, rtol=0, atol=0)  # old rows untouched
    text = torch.tensor([ids[:5] + [5, 17, 42] + ids[:3] + [99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(text).logits, from_checkpoint(text).logits)
