"""Trained weights come back exactly, on every path, with one error when they do not fit.

Paths: a Lightning `.ckpt` (the loader), an adapter-only and a merged export written by `EpochExport`'s
`export_model` and loaded from `epoch_N/`, an HF `checkpoint-N/` adapter folder, and dynamics' adapter swap-in.
Expected weights are computed here by hand (W + B @ A * alpha / r, planning rows appended to the embedding).
Also: `training_info.json` and the checkpoint extras (versions), the base-weights fingerprint, `check_vocabulary`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from callbacks.export import export_model
from core.errors import UserInputError
from lightning_modules.finetune import CausalLMFineTuner
from models.adapters import LoraSpec
from models.checkpoint_extras import CheckpointExtras, read_extras, write_extras
from models.checkpoints import CheckpointModels, describe_checkpoint
from models.fingerprint import check_fingerprint, fingerprint, recorded_fingerprint
from models.loader import check_vocabulary, load_trained
from models.loading import ModelSpec, load_model, load_tokenizer
from models.modes import TrainingMode
from models.training_info import FILE_NAME, TrainingInfo, read_training_info
from models.vocabulary import add_tokens
from tasks.planning import PlanningSpec

LORA = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "down_proj"])
PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)
MISSING = r"does not match this model \(backbone .+, mode [a-z+-]+\): 0 unexpected and 1 missing weights, e\.g\. '"
UNEXPECTED = r"does not match this model \(backbone .+, mode [a-z+-]+\): 1 unexpected and 0 missing weights"


def trained_module(folder: Path, mode: str = "lora", planning: PlanningSpec | None = None) -> CausalLMFineTuner:
    """A fine-tuner on `folder` whose trainable weights are random (as if trained), seeded."""
    module = CausalLMFineTuner(backbone=ModelSpec(name=str(folder)), mode=mode, lora=LORA, planning=planning)
    module.configure_model()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module


def trainable(module: CausalLMFineTuner) -> dict[str, torch.Tensor]:
    """The trainable weights, named as in the PEFT model."""
    return {name: p.detach().clone() for name, p in module.model.named_parameters() if p.requires_grad}


def merged_by_hand(folder: Path, weights: dict[str, torch.Tensor], planning_rows: int = 0) -> dict:
    """The base model's weights with every LoRA update added (W + B @ A * alpha / r) and the planning tokens'
    trained rows appended to the (tied) embedding."""
    expected = {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        target = name.removeprefix("base_model.model.").replace(".lora_A.default.weight", ".weight")
        b = weights[name.replace(".lora_A.", ".lora_B.")]
        expected[target] = expected[target] + b @ a * (LORA.alpha / LORA.r)
    rows = [v for k, v in weights.items() if "trainable_tokens_delta" in k]
    if planning_rows:
        assert len(rows) == 1 and rows[0].shape[0] == planning_rows
        embedding = torch.cat([expected["model.embed_tokens.weight"], rows[0]])
        expected["model.embed_tokens.weight"] = expected["lm_head.weight"] = embedding
    return expected


def assert_same_weights(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


def lightning_checkpoint(module: CausalLMFineTuner, path: Path, mode: str, planning: PlanningSpec) -> Path:
    """What `cli.py fit` saves (the fine-tuner's own on_save_checkpoint), with plain-dict hyper-parameters."""
    checkpoint = {"state_dict": module.state_dict(), "global_step": 3}
    module.on_save_checkpoint(checkpoint)
    checkpoint["hyper_parameters"] = {
        "backbone": asdict(module.backbone),
        "mode": mode,
        "lora": asdict(LORA),
        "planning": asdict(planning),
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory) -> Path:
    """A tiny Llama of the same config as `tiny_llama` but other random weights (another seed)."""
    return save_tiny(tmp_path_factory.mktemp("other-llama"), "llama", seed=1)


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory) -> dict:
    """A LoRA-trained module saved every way: Lightning checkpoint, adapter-only and merged exports (with their
    training_info.json) and an HF `checkpoint-5/` adapter folder."""
    root = tmp_path_factory.mktemp("lora-run")
    module = trained_module(tiny_llama)
    info = TrainingInfo(global_step=3, mode="lora", base_fingerprint=recorded_fingerprint(module.model))
    for name, adapter_only in (("epoch_0", True), ("epoch_1", False)):
        export_model(module, module.state_dict(), root / name, adapter_only=adapter_only)
        info.write(root / name)
    module.model.save_pretrained(root / "checkpoint-5")
    ckpt = lightning_checkpoint(module, root / "last.ckpt", "lora", PlanningSpec())
    return {"module": module, "root": root, "ckpt": ckpt, "weights": trainable(module)}


def test_every_loading_path_reloads_the_exact_lora_weights(lora_run, tiny_llama):
    spec, root, expected = (
        ModelSpec(name=str(tiny_llama)),
        lora_run["root"],
        merged_by_hand(tiny_llama, lora_run["weights"]),
    )
    for checkpoint in (lora_run["ckpt"], root / "epoch_0", root / "epoch_1", root / "checkpoint-5"):
        assert_same_weights(load_trained(spec, checkpoint).model.state_dict(), expected)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    reference.load_state_dict(expected)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    models = CheckpointModels(spec)
    for checkpoint in (lora_run["ckpt"], root / "checkpoint-5"):  # swapped into one base model
        with models.model(describe_checkpoint(checkpoint)) as swapped, torch.no_grad():
            adapter = {name: p for name, p in swapped.named_parameters() if ".lora_" in name}
            assert set(adapter) == set(lora_run["weights"])
            assert all(torch.equal(adapter[name], value) for name, value in lora_run["weights"].items())
            torch.testing.assert_close(swapped(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)


def test_lora_and_planning_rows_reload_exactly_from_a_checkpoint_and_both_exports(tiny_llama, tmp_path):
    module = trained_module(tiny_llama, "lora+prompt-tuning", PLANNING)
    spec, weights = ModelSpec(name=str(tiny_llama)), trainable(module)
    expected = merged_by_hand(tiny_llama, weights, planning_rows=len(module.new_tokens))
    ckpt = lightning_checkpoint(module, tmp_path / "last.ckpt", "lora+prompt-tuning", PLANNING)
    assert_same_weights(load_trained(spec, ckpt).model.state_dict(), expected)
    for name, adapter_only in (("epoch_0", True), ("epoch_1", False)):
        export_model(module, module.state_dict(), tmp_path / name, adapter_only=adapter_only)
        assert_same_weights(load_trained(spec, tmp_path / name).model.state_dict(), expected)


def test_full_weights_reload_exactly_from_a_checkpoint(tiny_llama, tmp_path):
    module = trained_module(tiny_llama, "full")
    expected = {name: value.clone() for name, value in module.model.state_dict().items()}
    ckpt = lightning_checkpoint(module, tmp_path / "last.ckpt", "full", PlanningSpec())
    assert_same_weights(load_trained(ModelSpec(name=str(tiny_llama)), ckpt).model.state_dict(), expected)


def rewrite_adapter(folder: Path, drop: bool) -> None:
    """The adapter file of `folder` without one of its weights (`drop`) or with one weight the model lacks."""
    file = folder / "adapter_model.safetensors"
    weights = load_file(file)
    if drop:
        weights.pop(sorted(weights)[-1])
    else:
        weights["base_model.model.model.layers.0.mlp.extra.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, file)


@pytest.mark.parametrize("drop", [True, False], ids=["missing", "unexpected"])
def test_a_missing_or_unexpected_weight_is_the_one_error_on_every_path(lora_run, tiny_llama, tmp_path, drop):
    spec, module, root = ModelSpec(name=str(tiny_llama)), lora_run["module"], lora_run["root"]
    pattern = MISSING if drop else UNEXPECTED
    name = sorted(lora_run["weights"])[-1]
    checkpoint = torch.load(lora_run["ckpt"], weights_only=True)
    if drop:
        del checkpoint["state_dict"][f"model.{name}"]
    else:
        checkpoint["state_dict"]["model.base_model.model.model.extra.weight"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    state = {key: value for key, value in module.state_dict().items() if not drop or key != f"model.{name}"}
    if not drop:
        state["model.base_model.model.model.extra.weight"] = torch.zeros(1)
    for folder in ("epoch_0", "checkpoint-5"):
        (tmp_path / folder).mkdir()
        for file in (root / folder).iterdir():
            (tmp_path / folder / file.name).write_bytes(file.read_bytes())
        rewrite_adapter(tmp_path / folder, drop)
    with pytest.raises(UserInputError, match=pattern):  # the Lightning checkpoint
        load_trained(spec, tmp_path / "bad.ckpt")
    with pytest.raises(UserInputError, match=pattern):  # an epoch_N/ adapter folder
        load_trained(spec, tmp_path / "epoch_0")
    with pytest.raises(UserInputError, match=pattern):  # an HF checkpoint-N/ adapter folder
        load_trained(spec, tmp_path / "checkpoint-5")
    for checkpoint in (tmp_path / "bad.ckpt", tmp_path / "checkpoint-5"):  # dynamics' swap-in
        with (
            pytest.raises(UserInputError, match=pattern),
            CheckpointModels(spec).model(describe_checkpoint(checkpoint)),
        ):
            pass
    if drop:  # the export of a training state: only the trainable weights are taken, so only a missing one
        with pytest.raises(UserInputError, match=pattern):
            export_model(module, state, tmp_path / "export", adapter_only=True)
    with pytest.raises(UserInputError, match=pattern):  # fit's resume
        module.on_load_checkpoint(torch.load(tmp_path / "bad.ckpt", weights_only=True))


def test_weights_trained_on_another_backbone_of_the_same_shapes_are_refused(lora_run, tiny_llama, other_llama):
    other, root = ModelSpec(name=str(other_llama)), lora_run["root"]
    recorded = recorded_fingerprint(lora_run["module"].model)
    found = fingerprint(load_model(other))
    assert recorded != found
    refusal = rf"trained on other base weights than {other_llama} \(base fingerprint {recorded} vs {found}\)"
    for checkpoint in (lora_run["ckpt"], root / "epoch_0"):
        with pytest.raises(UserInputError, match=refusal):
            load_trained(other, checkpoint)
    for checkpoint in (lora_run["ckpt"], root / "epoch_0"):  # epoch_0: an adapter-only export, swapped in
        with (
            pytest.raises(UserInputError, match=refusal),
            CheckpointModels(other).model(describe_checkpoint(checkpoint)),
        ):
            pass
    resumed = CausalLMFineTuner(backbone=other, mode="lora", lora=LORA)  # fit --ckpt_path on the other backbone
    resumed.configure_model()
    with pytest.raises(UserInputError, match=rf"the checkpoint was trained on other base weights than {other_llama}"):
        resumed.on_load_checkpoint(torch.load(lora_run["ckpt"], weights_only=True))
    # positive control: the backbone it was trained on loads; a folder recording no fingerprint loads as before
    assert load_trained(ModelSpec(name=str(tiny_llama)), lora_run["ckpt"]).step == 3
    assert load_trained(other, root / "checkpoint-5").model is not None


def test_the_fingerprint_is_the_same_for_every_dtype_and_training_setup(tiny_llama, tmp_path):
    spec = ModelSpec(name=str(tiny_llama))
    plain = fingerprint(load_model(spec))
    for dtype in ("bfloat16", "float16"):  # bf16-true / 16-true training, or an evaluation in either
        assert fingerprint(load_model(ModelSpec(name=str(tiny_llama), dtype=dtype))) == plain
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=getattr(torch, dtype)).save_pretrained(tmp_path / dtype)
        assert fingerprint(load_model(ModelSpec(name=str(tmp_path / dtype)))) == plain  # a folder saved in it
    # QLoRA: embeddings loaded in the compute dtype, then upcast to float32 for training
    qlora_like = load_model(ModelSpec(name=str(tiny_llama), dtype="float16"))
    qlora_like.get_input_embeddings().float()
    assert fingerprint(qlora_like) == plain
    # the training model (planning rows added, PEFT-wrapped) records the plain load's fingerprint
    module = trained_module(tiny_llama, "lora+prompt-tuning", PLANNING)
    assert recorded_fingerprint(module.model) == plain
    check_fingerprint(plain, load_model(spec), spec.name, "a run")


def test_training_info_round_trips_reads_version_less_files_and_refuses_newer_ones(tmp_path):
    info = TrainingInfo(
        global_step=8,
        epoch=1,
        mode="lora+prompt-tuning",
        backbone={"name": "org/model"},
        planning={**asdict(PLANNING), "tokens": PLANNING.key_tokens()},
        prompt={"style": "chat"},
        task="gsm8k",
        base_fingerprint="0123456789abcdef",
    )
    info.write(tmp_path)
    assert read_training_info(tmp_path) == info
    assert json.loads((tmp_path / FILE_NAME).read_text())["format_version"] == 1
    assert read_training_info(tmp_path).planning_spec == PLANNING and read_training_info(tmp_path).has_planning_tokens
    # written before versions existed (only some keys): version 1
    (tmp_path / FILE_NAME).write_text(json.dumps({"global_step": 4, "backbone": {"name": "org/model"}}))
    old = read_training_info(tmp_path)
    assert (old.format_version, old.global_step, old.backbone, old.epoch) == (1, 4, {"name": "org/model"}, None)
    assert old.planning_spec == PlanningSpec() and not old.has_planning_tokens
    assert read_training_info(tmp_path / "nowhere") is None
    (tmp_path / FILE_NAME).write_text(json.dumps({"global_step": 4, "format_version": 2}))
    with pytest.raises(UserInputError, match=rf"{tmp_path / FILE_NAME}: format_version 2 is not one"):
        read_training_info(tmp_path)


def test_checkpoint_extras_round_trip_and_refuse_a_newer_version():
    checkpoint = {"state_dict": {"model.a": torch.zeros(1), "model.b": torch.ones(1)}}
    extras = CheckpointExtras({"+": ["<+_0>"]}, {"torch": torch.get_rng_state()}, "0123456789abcdef")
    write_extras(checkpoint, extras, keep={"model.b"})
    assert set(checkpoint["state_dict"]) == {"model.b"} and checkpoint["extras_format_version"] == 1
    read = read_extras(checkpoint, "last.ckpt")
    assert read.planning_tokens == extras.planning_tokens and read.base_fingerprint == extras.base_fingerprint
    assert torch.equal(read.rng_states["torch"], extras.rng_states["torch"])
    assert read_extras({"planning_tokens": {}}, "old.ckpt") == CheckpointExtras({}, {}, None, 1)
    with pytest.raises(UserInputError, match="new.ckpt: format_version 2 is not one"):
        read_extras({"extras_format_version": 2}, "new.ckpt")


def test_training_mode_answers_every_question_of_the_config_value():
    table = {  # uses_lora, quantized, trains_token_rows, saves_trainable_only, unquantized
        "full": (False, False, False, False, "full"),
        "lora": (True, False, False, True, "lora"),
        "qlora": (True, True, False, True, "lora"),
        "prompt-tuning": (False, False, True, True, "prompt-tuning"),
        "lora+prompt-tuning": (True, False, True, True, "lora+prompt-tuning"),
        "qlora+prompt-tuning": (True, True, True, True, "lora+prompt-tuning"),
    }
    for name, answers in table.items():
        mode = TrainingMode(name)
        assert (mode.uses_lora, mode.quantized, mode.trains_token_rows, mode.saves_trainable_only) == answers[:4]
        assert mode.unquantized == answers[4] and mode == name and json.dumps(mode) == f'"{name}"'
    with pytest.raises(UserInputError, match="model.mode must be one of full, lora"):
        TrainingMode("lora+qlora")


def test_a_tokenizer_larger_than_the_embedding_is_one_error(tiny_llama):
    spec = ModelSpec(name=str(tiny_llama))
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    check_vocabulary(model, tokenizer, "checkpoint 'x'")  # as many tokens as rows
    add_tokens(tokenizer, ["<extra_0>", "<extra_1>"])
    rows = model.get_input_embeddings().weight.shape[0]
    with pytest.raises(
        UserInputError, match=rf"checkpoint 'x': its tokenizer has {rows + 2} tokens but the model only {rows} rows"
    ):
        check_vocabulary(model, tokenizer, "checkpoint 'x'")
