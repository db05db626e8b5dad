"""Learned step types (k-means, SQ-VAE and its variants) on real GSM8K solutions: K types, seeded
determinism, the annotation cache, and the fitted typer travelling in the datamodule's checkpoint state."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from helpers import REPO, run_dir, run_main, tiny_args, trainable_state
from transformers import AutoModelForCausalLM, AutoTokenizer

import datamodules.reasoning as reasoning
from core.errors import UserInputError
from datamodules.reasoning import ReasoningDataModule
from lightning_modules.finetune import CausalLMFineTuner
from models.loading import ModelSpec, load_model
from tasks.planning import PlanningSpec
from tasks.step_types import StepTyper, StepVAE, embed_steps, vae_loss

K = 3


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REASONING_LAB_CACHE", str(tmp_path / "cache"))


def datamodule(model_folder, method: str, cache: bool = True, epochs: int = 10) -> ReasoningDataModule:
    spec = PlanningSpec(method=method, n_prefix=1, n_special=1, num_types=K, vae_epochs=epochs, cache=cache)
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(model_folder)), mode="lora+prompt-tuning", planning=spec)
    assert module.planning.embedding_model == str(model_folder)  # by default the model being trained
    return ReasoningDataModule(
        val_size=2, train_limit=10, test_limit=2, max_length=1024, tokenizer=module.tokenizer, planning=module.planning
    )


def test_step_embeddings_are_the_mean_last_layer_state_of_each_step_after_the_earlier_ones(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    question, first, second = ids("Question: How many?\n "), ids("He has 2 pears."), ids(" \nShe has 3 apples.")
    with torch.no_grad():
        states = model(input_ids=torch.tensor([question + first + second]), output_hidden_states=True)
    last = states.hidden_states[-1][0]
    expected = torch.stack([last[len(question) : len(question) + len(first)].mean(0),
                            last[len(question) + len(first) :].mean(0)])  # fmt: skip
    after = embed_steps(model, tokenizer, "How many?", ["He has 2 pears.", "She has 3 apples."])
    torch.testing.assert_close(after, expected)
    alone = embed_steps(model, tokenizer, "How many?", ["She has 3 apples."])
    with torch.no_grad():
        states = model(input_ids=torch.tensor([question + ids("She has 3 apples.")]), output_hidden_states=True)
    torch.testing.assert_close(alone[0], states.hidden_states[-1][0, len(question) :].mean(0))
    assert not torch.allclose(alone[0], after[1])  # causal: the same step reads differently after another one


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kmeans", "vae"])
def test_learned_types_are_k_labels_deterministic_with_a_seed(tiny_llama, method):
    first, second = datamodule(tiny_llama, method, cache=False), datamodule(tiny_llama, method, cache=False)
    first.setup("fit")
    second.setup("fit")
    assert first.step_types == second.step_types and len(first.step_types) == 12  # train + validation
    labels = {label for types in first.step_types.values() for label in types}
    assert labels <= set(range(K)) and len(labels) >= (K if method == "kmeans" else 2)  # a VAE type may go unused
    row = first.splits["train"][0]
    text, types = first.tokenizer.decode([t for t in row["labels"] if t != -100]), first.step_types[row["id"]]
    assert [text.count(f"<{label}_0>") for label in range(K)] == [types.count(label) for label in range(K)]


def test_vae_variants_train_their_own_objective():
    torch.manual_seed(0)
    x = torch.randn(6, 16)
    successor = torch.tensor([1, 2, 2, 4, 5, 5])
    vae = StepVAE(16, K)
    generator = torch.Generator().manual_seed(0)
    plain = vae_loss(vae, x, x, x[successor], False, generator)
    generator = torch.Generator().manual_seed(0)
    contrastive = vae_loss(vae, x, x, x[successor], True, generator)
    # the objective from its definition, with the same noise draws: the steps' sample first, then their successors'
    generator = torch.Generator().manual_seed(0)

    def code_of(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_var = vae.encoder(inputs).chunk(2, dim=-1)
        noise = torch.randn(mean.shape, generator=generator)
        return vae.codebook(torch.softmax(mean + (0.5 * log_var).exp() * noise, dim=-1)), mean, log_var

    code, mean, log_var = code_of(x)
    kl = 0.5 * (mean**2 + log_var.exp() - 1 - log_var).sum()
    expected_plain = (0.5 * ((vae.decoder(code) - x) ** 2).sum() + 0.1 * kl) / 6
    next_code, _, _ = code_of(x[successor])
    expected_contrastive = expected_plain + torch.nn.functional.cosine_similarity(code, next_code, dim=-1).sum() / 6
    torch.testing.assert_close(plain, expected_plain)
    torch.testing.assert_close(contrastive, expected_contrastive)
    for method in ("vae-next-step", "vae-contrastive"):
        spec = PlanningSpec(method=method, n_special=1, num_types=K, vae_epochs=2)
        typer = StepTyper.fit(spec, x, successor)
        again = StepTyper.fit(spec, x, successor)
        assert typer.predict(x) == again.predict(x) and set(typer.predict(x)) <= set(range(K))
    with pytest.raises(ValueError, match="2 training steps cannot form 3 step types"):
        StepTyper.fit(PlanningSpec(method="kmeans", n_special=1, num_types=K), x[:2], successor[:2])


@pytest.mark.slow
def test_annotation_is_cached_and_the_typer_travels_in_the_checkpoint(tiny_llama, monkeypatch):
    first = datamodule(tiny_llama, "kmeans")
    first.setup("fit")
    state = first.state_dict()
    assert state["planning_typer"]["centres"].shape == (K, 64)

    def no_model(*args, **kwargs):
        raise AssertionError("the embedding model was loaded again")

    monkeypatch.setattr(reasoning, "load_model", no_model)
    second = datamodule(tiny_llama, "kmeans")
    second.setup("fit")  # from the cache: no embedding model, no fitting
    assert second.step_types == first.step_types

    monkeypatch.setattr(reasoning, "load_model", load_model)  # the test split needs embeddings...
    monkeypatch.setattr(StepTyper, "fit", no_model)  # ...but the typer must come from the checkpoint state
    restored = datamodule(tiny_llama, "kmeans", cache=False)
    restored.load_state_dict(state)  # before setup, as `test --ckpt_path` restores it after setup
    restored.setup("test")
    restored.test_dataloader()  # learned types encode the test split once the checkpoint is restored
    assert len(restored.splits["test"]) == 2 and all(restored.step_types[i] for i in restored.splits["test"]["id"])


def test_too_few_training_steps_is_one_clear_error(tiny_llama):
    spec = PlanningSpec(method="kmeans", n_special=1, num_types=50, cache=False)
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(tiny_llama)), mode="lora+prompt-tuning", planning=spec)
    data = ReasoningDataModule(val_size=1, train_limit=2, tokenizer=module.tokenizer, planning=module.planning)
    with pytest.raises(UserInputError, match="cannot form 50 step types"):
        data.setup("fit")


@pytest.mark.parametrize("method", ["kmeans", "vae", "vae-contrastive"])
def test_fitting_and_typing_steps_leave_the_global_rng_alone(method):
    """Only a cold typer cache fits and types: either must leave the training's random stream as it was."""
    x, successor = torch.randn(8, 16), torch.tensor([1, 2, 3, 3, 5, 6, 7, 7])
    before = torch.get_rng_state()
    typer = StepTyper.fit(PlanningSpec(method=method, n_special=1, num_types=K, vae_epochs=1), x, successor)
    typer.predict(x)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_a_fit_ends_with_the_same_weights_whether_the_typer_cache_is_cold_or_warm(tiny_llama, tmp_path):
    """Fitting the VAE typer (cold cache) must not reseed the training's global RNG (LoRA init, dropout)."""
    vae = ["--model.init_args.planning.method", "vae", "--model.init_args.planning.num_types", str(K),
           "--model.init_args.planning.vae_epochs", "2", "--data.train_limit", "8", "--data.val_size", "2",
           "--trainer.limit_val_batches", "0"]  # fmt: skip
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    assert run_main(["fit", *tiny_args(tiny_llama, cold, *vae)]) == 0
    assert list((tmp_path / "cache/planning").glob("*/typer.safetensors"))  # the warm run reads this
    assert run_main(["fit", *tiny_args(tiny_llama, warm, *vae)]) == 0
    expected, actual = (trainable_state(run_dir(r) / "checkpoints/last.ckpt") for r in (cold, warm))
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


@pytest.mark.slow
def test_under_ddp_rank_zero_alone_fits_the_typer_and_writes_the_cache(tiny_llama, tmp_path):
    kmeans = ["--model.init_args.planning.method", "kmeans", "--model.init_args.planning.num_types", str(K),
              "--data.val_size", "2", "--trainer.limit_val_batches", "0",
              "--trainer.devices", "2", "--trainer.strategy", "ddp"]  # fmt: skip
    command = [sys.executable, str(REPO / "cli.py"), "fit", *tiny_args(tiny_llama, tmp_path / "runs", *kmeans)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Fitting kmeans step types") == 1  # one rank embedded the steps and fitted
    cache = tmp_path / "cache/planning"
    assert len(list(cache.glob("*/typer.safetensors"))) == 1 and not list(cache.rglob(".*"))  # no temporaries
    state = torch.load(run_dir(tmp_path / "runs") / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # 16 examples / (2 ranks x 4): both ranks trained on typed targets


class Rank:
    """The part of a DDP trainer the datamodule uses: rank 0 records what it broadcasts, rank 1 receives it."""

    def __init__(self, zero: bool, sent: list) -> None:
        self.world_size, self.strategy, self.sent = 2, self, sent
        self.is_global_zero = zero

    def broadcast(self, obj, src: int = 0):
        if self.is_global_zero:
            self.sent.append(obj)
            return obj
        return self.sent[-1]


def test_other_ranks_take_rank_zeros_typer_and_types_without_embedding(tiny_llama, monkeypatch):
    """The rank logic of the DDP test above, in one process."""
    sent = []
    zero, one = datamodule(tiny_llama, "kmeans", cache=False), datamodule(tiny_llama, "kmeans", cache=False)
    zero.trainer, one.trainer = Rank(True, sent), Rank(False, sent)
    zero.setup("fit")
    with monkeypatch.context() as patch:
        patch.setattr(reasoning, "load_model", lambda *a, **k: pytest.fail("rank 1 loaded the embedding model"))
        one.setup("fit")
    assert one.step_types == zero.step_types and len(one.step_types) == 12
    assert torch.equal(one.typer.tensors["centres"], zero.typer.tensors["centres"])
    assert one.splits["train"]["labels"] == zero.splits["train"]["labels"]

    few = replace(zero.planning, num_types=50)  # rank 0's error stops every rank
    for zero_rank in (True, False):
        data = ReasoningDataModule(val_size=1, train_limit=2, tokenizer=zero.tokenizer, planning=few)
        data.trainer = Rank(zero_rank, sent)
        with pytest.raises(UserInputError, match="cannot form 50 step types"):
            data.setup("fit")
