"""Likelihood dynamics over checkpoints: discovery and order, adapter swapping, resume, bad checkpoints,
TensorBoard events; the live callback inside a fit; likelihood-based data selection into a training config."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_dir, run_main, tiny_args
from peft import LoraConfig, PeftModel, get_peft_model
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

import commands.dynamics
from commands.dynamics import dynamics
from core.errors import UserInputError
from evaluation.likelihood import ScoringSpec, load_pool, score_pool
from models.checkpoints import CheckpointModels, discover_checkpoints
from models.loading import ModelSpec

POOL = [
    {"instruction": "Solve.", "input": "Tom has 3 apples, buys 4 more. How many?", "output": "3 + 4 = 7", "type": "a"},
    {"instruction": "", "input": "What is 2 times 8?", "output": "2 * 8 = 16 so the answer is 16", "type": "b"},
    {"instruction": "Add.", "input": "5 and 7", "output": "It is 12.", "type": "a"},
]
TAGS = ("log_likelihood", "perplexity", "token_count", "entropy")


@pytest.fixture
def pool(tmp_path) -> Path:
    path = tmp_path / "pool.json"
    path.write_text(json.dumps(POOL))
    return path


def perturbed(model_folder: Path, seed: int):
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture
def hf_run(tmp_path, tiny_llama) -> Path:
    """An HF-Trainer-style run: full checkpoints 2 and 10, a LoRA adapter checkpoint 6, an epoch_1 export."""
    run = tmp_path / "run"
    for step in (2, 10):
        perturbed(tiny_llama, step).save_pretrained(run / f"checkpoint-{step}")
    adapter = LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(6)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).save_pretrained(run / "checkpoint-6")
    perturbed(tiny_llama, 7).save_pretrained(run / "epoch_1")
    (run / "epoch_1/training_info.json").write_text(json.dumps({"global_step": 7}))
    return run


def reference_models(tiny_llama: Path, run: Path) -> dict[int, torch.nn.Module]:
    """Each checkpoint loaded on its own with plain transformers / PEFT (a fresh load each)."""
    return {
        0: AutoModelForCausalLM.from_pretrained(tiny_llama),
        2: AutoModelForCausalLM.from_pretrained(run / "checkpoint-2"),
        6: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), run / "checkpoint-6"),
        7: AutoModelForCausalLM.from_pretrained(run / "epoch_1"),
        10: AutoModelForCausalLM.from_pretrained(run / "checkpoint-10"),
    }


def test_discovery_sorts_steps_as_integers(hf_run):
    discovery = discover_checkpoints(hf_run)
    assert [(c.name, c.step, c.kind) for c in discovery.checkpoints] == [
        ("base_model", 0, "base"),
        ("checkpoint-2", 2, "hf"),
        ("checkpoint-6", 6, "hf"),
        ("epoch_1", 7, "export"),
        ("checkpoint-10", 10, "hf"),
    ]
    assert discovery.problems == []


def test_all_checkpoints_equal_separate_loads_and_the_events_hold_the_curves(hf_run, tiny_llama, pool, tmp_path):
    out = tmp_path / "out"
    summary = dynamics(str(hf_run), str(pool), model=ModelSpec(name=str(tiny_llama)), output=str(out))
    assert summary["steps"] == [0, 2, 6, 7, 10] and summary["checkpoints"][0] == "base_model"
    assert summary["settings"]["prompt"]["style"] == "chat" and summary["settings"]["score"] == "response"

    tokenizer, samples = AutoTokenizer.from_pretrained(tiny_llama), load_pool(pool)
    for index, (step, model) in enumerate(reference_models(tiny_llama, hf_run).items()):
        expected = score_pool(model.eval(), tokenizer, samples, ScoringSpec())
        record = json.loads((out / "checkpoints" / f"{summary['checkpoints'][index]}.json").read_text())
        assert record["step"] == step
        for got, want in zip(record["results"], expected, strict=True):
            for metric in TAGS:
                assert got["metrics"][metric] == pytest.approx(want["metrics"][metric], rel=1e-5, abs=1e-5)
        a_values = [r["metrics"]["perplexity"] for r in expected if r["type"] == "a"]
        assert summary["results_by_type"]["a"]["perplexity"][index] == pytest.approx(a_values, rel=1e-5)

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {f"dynamics/{t}/{m}" for t in "ab" for m in TAGS} <= set(events.Tags()["scalars"])
    perplexity = events.Scalars("dynamics/b/perplexity")
    assert [event.step for event in perplexity] == [0, 2, 6, 7, 10]
    expected_b = summary["results_by_type"]["b"]["avg_perplexity"]
    assert [event.value for event in perplexity] == pytest.approx(expected_b, rel=1e-6)


def test_the_base_model_scores_unchanged_after_adapters_were_swapped_in(hf_run, tiny_llama, pool):
    models, samples = CheckpointModels(ModelSpec(name=str(tiny_llama))), load_pool(pool)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    base, adapter = discover_checkpoints(hf_run).checkpoints[0], discover_checkpoints(hf_run).checkpoints[2]
    with models.model(base) as model:
        before = score_pool(model, tokenizer, samples, ScoringSpec())
    with models.model(adapter) as model:
        adapted = score_pool(model, tokenizer, samples, ScoringSpec())
    with models.model(base) as model:
        after = score_pool(model, tokenizer, samples, ScoringSpec())
    assert after == before and adapted != before


class SimulatedCrash(BaseException):
    """Like a kill or Ctrl-C: not an Exception, so no error handler turns it into a skipped checkpoint."""


@pytest.mark.slow
def test_resume_after_a_crash_recomputes_nothing(hf_run, tiny_llama, pool, tmp_path, monkeypatch):
    spec = ModelSpec(name=str(tiny_llama))
    straight = dynamics(str(hf_run), str(pool), model=spec, output=str(tmp_path / "straight"))
    calls, crashed = [], []

    def crashing_score_pool(*args, **kwargs):
        calls.append(kwargs["progress"])
        if len(calls) == 3 and not crashed:
            crashed.append(True)
            raise SimulatedCrash
        return score_pool(*args, **kwargs)

    monkeypatch.setattr(commands.dynamics, "score_pool", crashing_score_pool)
    out = tmp_path / "resumed"
    with pytest.raises(SimulatedCrash):
        dynamics(str(hf_run), str(pool), model=spec, output=str(out))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["base_model.json", "checkpoint-2.json"]
    assert json.loads((out / "summary.json").read_text())["steps"] == [0, 2]  # complete JSON after the crash

    calls.clear()
    resumed = dynamics(str(hf_run), str(pool), model=spec, output=str(out))
    assert calls == ["checkpoint-6", "epoch_1", "checkpoint-10"]  # nothing already written is recomputed
    assert resumed["results_by_type"] == straight["results_by_type"]

    calls.clear()
    weights = hf_run / "checkpoint-2/model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # written again
    dynamics(str(hf_run), str(pool), model=spec, output=str(out))
    assert calls == ["checkpoint-2"]

    calls.clear()
    dynamics(str(hf_run), str(pool), model=spec, output=str(out), scoring=ScoringSpec(score="all"))
    assert len(calls) == 5  # other settings: nothing is reused


def test_bad_checkpoints_are_named_and_skipped(hf_run, tiny_llama, pool, tmp_path, caplog):
    truncated = hf_run / "checkpoint-4"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((hf_run / "checkpoint-2/config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((hf_run / "checkpoint-2/model.safetensors").read_bytes()[:1000])
    (hf_run / "checkpoint-8").mkdir()  # a folder the trainer had only started to write
    (hf_run / "epoch_2").mkdir()
    (hf_run / "epoch_2/config.json").write_text("{}")
    (hf_run / "epoch_2/model.safetensors").write_text("")
    with caplog.at_level(logging.WARNING):
        summary = dynamics(str(hf_run), str(pool), model=ModelSpec(name=str(tiny_llama)), output=str(tmp_path / "o"))
    assert summary["steps"] == [0, 2, 6, 7, 10]
    skipped = {problem["checkpoint"]: problem["reason"] for problem in summary["skipped"]}
    assert set(skipped) == {"checkpoint-4", "checkpoint-8", "epoch_2"}
    assert "model.safetensors is unreadable (truncated or corrupt?" in skipped["checkpoint-4"]
    assert "neither config.json" in skipped["checkpoint-8"]
    assert "training_info.json" in skipped["epoch_2"]
    assert all(f"skipped {name}" in caplog.text for name in skipped)


def test_bad_input_is_one_clear_error(tmp_path, pool, capsys):
    (tmp_path / "empty").mkdir()
    assert run_main(["dynamics", "--folder", str(tmp_path / "empty"), "--pool", str(pool)]) == 2
    assert "no checkpoints in" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="does not exist"):
        discover_checkpoints(tmp_path / "missing")
    bad_pool = tmp_path / "bad.json"
    bad_pool.write_text(json.dumps([*POOL, {"input": "q", "output": "", "type": "a"}]))
    assert run_main(["dynamics", "--folder", str(tmp_path / "empty"), "--pool", str(bad_pool)]) == 2
    err = capsys.readouterr().err
    assert "bad.json item 3: field 'output' is missing or empty" in err and "Traceback" not in err


@pytest.mark.slow
def test_live_callback_in_fit_matches_the_offline_command(tiny_llama, tmp_path, pool):
    callback = json.dumps(
        {"class_path": "callbacks.dynamics.LikelihoodDynamics", "init_args": {"pool": str(pool), "every_n_steps": 3}}
    )
    guard = '{"class_path": "helpers.AssertTrainMode"}'
    args = tiny_args(tiny_llama, tmp_path, "--trainer.max_epochs", "2", f"--trainer.callbacks+={callback}")
    assert run_main(["fit", *args, f"--trainer.callbacks+={guard}"]) == 0
    run = run_dir(tmp_path)
    live = json.loads((run / "dynamics/summary.json").read_text())
    assert live["steps"] == [0, 3, 4, 6, 8]  # base, every 3 steps, and the checkpoints at epoch ends (4, 8)
    assert live["settings"]["prompt"]["style"] == "chat"
    events = EventAccumulator(str(run)).Reload()
    assert [event.step for event in events.Scalars("dynamics/a/perplexity")] == [0, 3, 4, 6, 8]

    offline = dynamics(str(run), str(pool), model=ModelSpec(name=str(tiny_llama)))  # Lightning ckpts and exports
    assert offline["steps"] == [0, 4, 8] and offline["checkpoints"][2].endswith(".ckpt")
    # The run trains planning tokens (lora+prompt-tuning): its checkpoints load with their added rows. Step 0
    # differs by design: live, the model at step 0 already has the initialised planning rows; offline, the base
    # model is the backbone as it is.
    for name in "ab":
        live_values = [live["results_by_type"][name]["avg_log_likelihood"][live["steps"].index(s)] for s in (4, 8)]
        assert offline["results_by_type"][name]["avg_log_likelihood"][1:] == pytest.approx(live_values, rel=1e-4)


@pytest.mark.slow
def test_select_writes_three_sets_that_train_high_fits_on(tiny_llama, tmp_path, pool):
    predictions = tmp_path / "predictions.jsonl"
    rows = [
        {"id": "q1", "question": "What is 3 + 4?", "answer": "7", "completions": ["3 + 4 = 7\n#### 7", "", "7"]},
        {"id": "q2", "question": "What is 2 * 8?", "answer": "16", "completion": "2 * 8 = 16\n#### 16"},
        {"id": "q2", "question": "What is 2 * 8?", "answer": "16", "completion": "It is 16, since 2 * 8 = 16."},
        {"id": "q3", "question": "Name 5 minus 1.", "answer": "4", "completions": ["", " "]},
    ]
    predictions.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "selection"
    code = run_main(["select", "--candidates", str(predictions), "--model.name", str(tiny_llama),
                     "--output_dir", str(out), "--seed", "3"])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "selection.json").read_text())
    assert summary["questions"] == 3 and summary["selected_questions"] == 2 and summary["empty_candidates"] == 3
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    for name, pick in (("high", max), ("low", min)):
        chosen = [json.loads(line) for line in (out / f"train_{name}.jsonl").read_text().splitlines()]
        assert [row["id"] for row in chosen] == ["q1", "q2"] and chosen[0]["answer"] == "7"
        assert chosen[0]["instruction"].startswith("Please reason step by step")
        for index, row in enumerate(chosen):
            best = pick((s for s in scores if s["question_index"] == index), key=lambda s: s["log_likelihood"])
            assert row["output"] == best["output"]
    rand = [json.loads(line)["output"] for line in (out / "train_rand.jsonl").read_text().splitlines()]
    assert rand[0] in rows[0]["completions"] and rand[1] in (rows[1]["completion"], rows[2]["completion"])

    # configs/train_high.yaml fine-tunes on the selected set with the dynamics callback on.
    args = ["fit", "--config", str(REPO / "configs/train_high.yaml"),
            "--config", str(REPO / "configs/presets/cpu_demo.yaml"), "--model.init_args.backbone.name", str(tiny_llama),
            "--data.train_path", str(out / "train_high.jsonl"),
            "--data.val_size", "1", "--data.max_length", "256", "--model.init_args.generation.max_new_tokens", "4",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert run_main(args) == 0
    live = json.loads((tmp_path / "runs/train_high/version_0/dynamics/summary.json").read_text())
    assert live["steps"] == [0, 1] and set(live["results_by_type"]) == {"train", "test", "test_mismatched"}


def test_bad_candidates_are_named_by_line(tmp_path, capsys):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"question": "q", "completions": ["a"]}) + "\n" + json.dumps({"question": "q"}) + "\n")
    assert run_main(["select", "--candidates", str(path)]) == 2
    assert "predictions.jsonl:2: needs 'completions'" in capsys.readouterr().err


@pytest.mark.slow
def test_generated_solutions_feed_the_selection(tiny_llama, tmp_path):
    """configs/generate_solutions.yaml (predict with repeats) writes what `select` reads."""
    args = ["predict", "--config", str(REPO / "configs/generate_solutions.yaml"),
            "--model.init_args.backbone.name", str(tiny_llama), "--data.test_limit", "3",
            "--model.init_args.generation.max_new_tokens", "6", "--model.init_args.generation.repeats", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    assert run_main(args) == 0
    predictions = tmp_path / "runs/generate_solutions/version_0/predictions.jsonl"
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 3 and all(len(row["completions"]) == 3 for row in rows)
    out = tmp_path / "selection"
    args = ["select", "--candidates", str(predictions), "--model.name", str(tiny_llama), "--output_dir", str(out)]
    assert run_main(args) == 0
    for name in ("high", "low", "rand"):
        chosen = [json.loads(line) for line in (out / f"train_{name}.jsonl").read_text().splitlines()]
        assert all(row["output"] in rows[i]["completions"] for i, row in enumerate(chosen))


def test_one_checkpoint_equals_its_entry_in_the_all_checkpoints_output(hf_run, tiny_llama, pool, tmp_path, capsys):
    """`dynamics --checkpoint` scores one checkpoint (no base model unless asked) into one file, with the same
    numbers the whole-run command gives it; any model folder will do (upstream code 001's calculate_llh.py)."""
    spec = ModelSpec(name=str(tiny_llama))
    full = dynamics(str(hf_run), str(pool), model=spec, output=str(tmp_path / "all"))
    for name in ("checkpoint-6", "epoch_1"):  # a LoRA adapter swapped into the base, and a full export
        one = dynamics(pool=str(pool), checkpoint=str(hf_run / name), model=spec)
        written = json.loads((hf_run / f"{name}.dynamics.json").read_text())
        assert (
            written == one
            and one["checkpoints"] == [name]
            and one["steps"] == [full["steps"][full["checkpoints"].index(name)]]
        )
        index = full["checkpoints"].index(name)
        for kind, metrics in one["results_by_type"].items():
            for metric in TAGS:
                assert metrics[metric][0] == pytest.approx(full["results_by_type"][kind][metric][index], rel=1e-6)
    copied = tmp_path / "another-groups-model"  # a plain model folder under any name
    shutil.copytree(hf_run / "checkpoint-2", copied)
    both = dynamics(pool=str(pool), checkpoint=str(copied), model=spec, with_base=True, output=str(tmp_path / "b.json"))
    assert both["checkpoints"] == ["base_model", "another-groups-model"] and both["steps"] == [0, 0]
    assert both["results_by_type"]["a"]["log_likelihood"][1] == pytest.approx(
        full["results_by_type"]["a"]["log_likelihood"][full["checkpoints"].index("checkpoint-2")], rel=1e-6
    )
    assert run_main(["dynamics", "--pool", str(pool)]) == 2
    assert "either --folder (a run) or --checkpoint" in capsys.readouterr().err
