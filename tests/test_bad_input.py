"""Bad input and faults through `cli.main`: exit code 2, one `error:` line naming the file / line / key, no
traceback, and no partial output (no run directory, no output folder) left behind."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, synthetic_traces, tiny_args, write_jsonl

from cli import main
from commands import calibrate as calibrate_command
from commands import compare as compare_command
from core.io import write_file_set
from datamodules.reasoning import ReasoningDataModule
from tasks.examples import TASKS, load_examples
from tasks.prompts import PromptFormatter, PromptSpec
from tasks.scoring import extract_gsm8k, extract_math, math_equivalent, numbers_equivalent, score_completion

GSM8K_TRAIN = REPO / "data/gsm8k/train.jsonl"
ONE_STEP = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--export.enabled", "false")
TRUNCATED = "unreadable (truncated or corrupt?"
PICKLED = "not a plain-weights checkpoint (refused:"


def slot_args(model: Path, save_dir: Path, checkpoint: Path) -> list[str]:
    return [
        "test", "--config", str(REPO / "configs/slot.yaml"),
        "--model.init_args.backbone.name", str(model), "--model.init_args.checkpoint", str(checkpoint),
        "--data.test_limit", "2", "--trainer.logger.init_args.save_dir", str(save_dir),
    ]  # fmt: skip


def error_line(args: list[str], capsys) -> str:
    """Run `cli.main(args)`; it must exit 2 with exactly one `error:` line and no traceback. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err and "usage:" not in err, err
    return errors[0]


def gsm8k_lines(count: int) -> list[bytes]:
    return GSM8K_TRAIN.read_bytes().splitlines(keepends=True)[:count]


def non_utf8_file(path: Path, bad_line: int) -> Path:
    """A GSM8K JSONL file whose line `bad_line` (1-based) holds a Latin-1 byte."""
    lines = gsm8k_lines(12)
    lines[bad_line - 1] = lines[bad_line - 1].replace(b"a", b"caf\xe9", 1)
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A truncated checkpoint file and one that holds a pickled object (refused by weights_only loading)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    state = {"state_dict": {f"model.layer{i}.weight": torch.randn(64, 64) for i in range(4)}, "global_step": 3}
    torch.save(state, folder / "whole.ckpt")
    data = (folder / "whole.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    torch.save({"state_dict": {}, "payload": argparse.Namespace(code="runs on load")}, folder / "pickled.ckpt")
    return {"truncated": folder / "truncated.ckpt", "pickled": folder / "pickled.ckpt"}


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory) -> Path:
    """The last checkpoint of a 1-step fit of the tiny model (mode lora+prompt-tuning, lora.r 16)."""
    runs = tmp_path_factory.mktemp("trained")
    main(["fit", *tiny_args(tiny_llama, runs, *ONE_STEP)])
    return runs / "planning_gsm8k/version_0/checkpoints/last.ckpt"


# 1. Non-UTF-8 bytes in a data file: the file and the line.


def test_non_utf8_training_file_names_file_and_line_and_leaves_no_run(tiny_llama, tmp_path, capsys):
    data = non_utf8_file(tmp_path / "latin1.jsonl", bad_line=7)
    line = error_line(["fit", *tiny_args(tiny_llama, tmp_path / "runs", "--data.train_path", str(data))], capsys)
    assert line.startswith(f"error: {data}:7: not UTF-8 text (byte 0xe9")
    assert not (tmp_path / "runs").exists()


def test_non_utf8_candidates_and_pool_name_file_and_line(tmp_path, capsys):
    data = non_utf8_file(tmp_path / "latin1.jsonl", bad_line=3)
    out = tmp_path / "selection"
    line = error_line(["select", "--candidates", str(data), "--output_dir", str(out)], capsys)
    assert line.startswith(f"error: {data}:3: not UTF-8 text") and not out.exists()
    pool = non_utf8_file(tmp_path / "pool.jsonl", bad_line=5)
    line = error_line(["dynamics", "--folder", str(tmp_path), "--pool", str(pool)], capsys)
    assert line.startswith(f"error: {pool}:5: not UTF-8 text")
    assert not (tmp_path / "dynamics_offline").exists()


# 2. and 3. Truncated and pickled-payload checkpoints: `test --ckpt_path` and SLOT's checkpoint.


@pytest.mark.parametrize("kind", ["truncated", "pickled"])
def test_bad_ckpt_path_is_one_line_before_anything_runs(kind, checkpoints, tiny_llama, tmp_path, capsys):
    bad = checkpoints[kind]
    line = error_line(["test", *tiny_args(tiny_llama, tmp_path / "runs", "--ckpt_path", str(bad))], capsys)
    assert line.startswith(f"error: checkpoint '{bad}': {TRUNCATED if kind == 'truncated' else PICKLED}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kind", ["truncated", "pickled"])
def test_bad_slot_checkpoint_is_one_line_and_leaves_no_run(kind, checkpoints, tiny_llama, tmp_path, capsys):
    bad = checkpoints[kind]
    line = error_line(slot_args(tiny_llama, tmp_path / "runs", bad), capsys)
    assert line.startswith(f"error: checkpoint '{bad}': {TRUNCATED if kind == 'truncated' else PICKLED}")
    assert not (tmp_path / "runs").exists()


# 4. The output folder is a file (or under one).


def test_output_folder_under_a_file(tiny_llama, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    line = error_line(["fit", *tiny_args(tiny_llama, blocker / "runs")], capsys)
    assert line == (
        f"error: trainer.logger.init_args.save_dir: the output folder '{blocker}/runs' is under '{blocker}', "
        "a file; choose another folder"
    )
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"question": "2+2?", "completions": ["4"]}) + "\n")
    line = error_line(["select", "--candidates", str(candidates), "--output_dir", str(blocker)], capsys)
    assert line == f"error: select --output_dir: the output folder '{blocker}' is a file; choose another folder"
    assert blocker.read_text() == "not a folder\n"


# 5. A truncated .jsonl.gz traces file for calibrate.


def test_truncated_gzip_traces(tmp_path, capsys):
    probs = [f"{0.5 ** (rank + 1):.8f}" for rank in range(20)]
    lines = [json.dumps({"gt": i % 20, "top_ids": list(range(20)), "top_probs": probs}) for i in range(400)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    traces = tmp_path / "traces.jsonl.gz"
    traces.write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "calibration"
    line = error_line(["calibrate", "--traces", str(traces), "--output_dir", str(out)], capsys)
    assert line.startswith(f"error: {traces}: unreadable after line ") and "truncated or corrupt? EOFError" in line
    assert not out.exists()


# 6. A misspelt nested key: the key and its valid neighbours, not jsonargparse's nested Union error.


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--model.init_args.lora.rank", "8"],
            "error: unknown key 'model.init_args.lora.rank' (model.init_args.lora takes: r, alpha, dropout, "
            "target_modules)",
        ),
        (
            ["--config", "LORA_RR_YAML"],
            "error: unknown key 'model.init_args.lora.rr': did you mean 'r'? (model.init_args.lora takes: r, alpha, "
            "dropout, target_modules)",
        ),
        (
            ["--model.init_args.generation.decoding", "{temprature: 0.7}"],
            "error: unknown key 'model.init_args.generation.decoding.temprature': did you mean 'temperature'? "
            "(model.init_args.generation.decoding takes: temperature, top_k, top_p, min_p, prob_threshold, "
            "hewitt_epsilon, greedy_threshold, dynamic_top_k, edt_var, confidence_bin_only, cal_acc)",
        ),
        (
            ["--model.init_args.planing.n_prefix", "2"],
            "error: unknown key 'model.init_args.planing': did you mean 'planning'? (model.init_args takes: "
            "backbone, mode, lora, loss, planning, generation, rank_log, optimizer, scheduler)",
        ),
        (
            ["--model.init_args.generation.decoding.top_kk", "3"],
            "error: unknown key 'model.init_args.generation.decoding.top_kk': did you mean 'top_k' or 'top_p'?",
        ),
        (["--data.batch_sise", "4"], "error: unknown key 'data.batch_sise': did you mean 'batch_size' or"),
        (
            ["--config", "TRAINER_YAML"],
            "error: unknown key 'trainer.max_epochz': did you mean 'max_epochs' or 'min_epochs' or 'max_steps'?",
        ),
    ],
    ids=["cli-lora-rank", "yaml-lora-rr", "decoding-dict", "planing", "decoding-dotted", "data", "yaml-trainer"],
)
def test_misspelt_key_is_one_line_with_neighbours(extra, expected, tiny_llama, tmp_path, capsys):
    configs = {
        "LORA_RR_YAML": {"model": {"init_args": {"lora": {"rr": 8}}}},
        "TRAINER_YAML": {"trainer": {"max_epochz": 3}},
    }
    for name, content in configs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(content))
    extra = [str(tmp_path / f"{arg}.yaml") if arg in configs else arg for arg in extra]
    line = error_line(["fit", *tiny_args(tiny_llama, tmp_path / "runs", *extra)], capsys)
    assert line.startswith(expected)
    assert not (tmp_path / "runs").exists()


# 8. Model settings on the command line that the checkpoint's would replace.


@pytest.mark.slow
def test_model_override_with_ckpt_path_is_refused(trained, tiny_llama, tmp_path, capsys):
    args = tiny_args(tiny_llama, tmp_path / "runs", "--ckpt_path", str(trained))
    line = error_line(["test", *args, "--model.init_args.lora.r", "8"], capsys)
    assert line == (
        f"error: --model.init_args.lora.r 8: the checkpoint '{trained}' was trained with lora.r = 16, "
        "and --ckpt_path rebuilds the model with the checkpoint's settings; drop the option"
    )
    line = error_line(["test", *args, "--model.init_args.mode=full"], capsys)
    assert "--model.init_args.mode 'full'" in line and "mode = 'lora+prompt-tuning'" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_evaluation_knobs_apply_with_ckpt_path(trained, tiny_llama, tmp_path):
    """generation / rank_log are not saved hyper-parameters: given with --ckpt_path they are used (a rank log
    is written only when rank_log is set); an override equal to the checkpoint's value passes."""
    knobs = ["--model.init_args.rank_log", "{low_confidence: 0.3}", "--model.init_args.lora.r", "16"]
    args = tiny_args(tiny_llama, tmp_path / "runs", "--ckpt_path", str(trained), "--data.test_limit", "2", *knobs)
    main(["test", *args])
    ranks = list((tmp_path / "runs/planning_gsm8k/version_0/samples").glob("test_step*_ranks.jsonl"))
    assert len(ranks) == 1 and len(ranks[0].read_text().splitlines()) == 2


# 9. An explicit existing run version on a new fit.


@pytest.mark.slow
def test_existing_run_version_is_refused_unless_overwrite(tiny_llama, tmp_path, capsys):
    old = tmp_path / "runs/planning_gsm8k/version_0"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints/last.ckpt").write_bytes(b"the old run")
    args = tiny_args(tiny_llama, tmp_path / "runs", "--trainer.logger.init_args.version", "version_0", *ONE_STEP)
    line = error_line(["fit", *args], capsys)
    assert line == (
        f"error: trainer.logger.init_args.version: the run directory '{old}' already holds a run; resume it with "
        "--ckpt_path last, choose another version, or start over in it with --overwrite_run true"
    )
    assert (old / "checkpoints/last.ckpt").read_bytes() == b"the old run"
    main(["fit", *args, "--overwrite_run", "true"])
    assert torch.load(old / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 1
    assert yaml.safe_load((old / "config.yaml").read_text())["overwrite_run"] is False  # never saved as true


# 10. A data error leaves no run directory (the logger made one before the data was read).


def test_data_error_leaves_no_run_directory(tiny_llama, tmp_path, capsys):
    lines = gsm8k_lines(12)
    lines[4] = json.dumps({"question": "What is 2+2?"}).encode() + b"\n"
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(lines))
    (tmp_path / "runs/planning_gsm8k/version_0").mkdir(parents=True)  # an earlier run's folder stays
    line = error_line(["fit", *tiny_args(tiny_llama, tmp_path / "runs", "--data.train_path", str(data))], capsys)
    assert line == f"error: {data}:5: missing field 'answer'"
    assert [p.name for p in (tmp_path / "runs/planning_gsm8k").iterdir()] == ["version_0"]


# 11. Truncation in training names the first dropped / truncated example ids.


def test_truncation_warning_names_the_first_example_ids(tiny_tokenizer, tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"".join(gsm8k_lines(30)))
    formatter = PromptFormatter(tiny_tokenizer, PromptSpec())
    examples = load_examples(TASKS["gsm8k"], str(data), "train")
    max_length = 1 + max(len(formatter.encode_prompt(e.question)) for e in examples)  # no prompt alone too long
    module = ReasoningDataModule(train_path=str(data), val_size=4, max_length=max_length, tokenizer=tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="datamodules.reasoning"):
        train, _ = module._train_and_val()
        module._encode(train, "train")
    long = [e.id for e in train if len(formatter.encode_example(e.question, e.response)[0]) > max_length]
    assert len(long) > 5
    expected = f"train: {len(long)} examples truncated to {max_length} tokens (ids {', '.join(long[:5])} and "
    assert expected + f"{len(long) - 5} more), 0 dropped" in caplog.text


# 12. A GSM8K row without "####": the file and line (not the whole solution taken as the gold answer).


@pytest.mark.parametrize("command", ["fit", "test"])
def test_gsm8k_row_without_final_answer_names_file_and_line(command, tiny_llama, tmp_path, capsys):
    lines = gsm8k_lines(12)
    row = json.loads(lines[2])
    row["answer"] = row["answer"].split("####")[0].strip()  # the solution without its "#### N" line
    lines[2] = json.dumps(row).encode() + b"\n"
    data = tmp_path / "no_final_answer.jsonl"
    data.write_bytes(b"".join(lines))
    option = "--data.train_path" if command == "fit" else "--data.test_path"
    line = error_line([command, *tiny_args(tiny_llama, tmp_path / "runs", option, str(data))], capsys)
    assert line == (
        f"error: {data}:3: field 'answer' has no '#### <final answer>' line (GSM8K's format: the solution, then "
        "'#### 42'); without it the whole solution would be the gold answer"
    )
    assert not (tmp_path / "runs").exists()
    row["answer"] += "\n####  "
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=rf"^{data}:1: field 'answer' has nothing after '####'"):
        load_examples(TASKS["gsm8k"], str(data), "train")
    assert [len(load_examples(TASKS["gsm8k"], None, split)) for split in ("train", "test")] == [7473, 1319]


# 13. A truncated weights or tokenizer file in a backbone folder: the folder and the file, no run directory.


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("model.safetensors", "SafetensorError: Error while deserializing header: incomplete metadata"),
        ("tokenizer.json", "JSONDecodeError: "),
    ],
)
def test_truncated_backbone_file_is_one_line_and_leaves_no_run(name, reason, tiny_llama, tmp_path, capsys):
    folder = tmp_path / "backbone"
    shutil.copytree(tiny_llama, folder)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    line = error_line(["fit", *tiny_args(folder, tmp_path / "runs", *ONE_STEP)], capsys)
    assert line.startswith(f"error: model folder '{folder}': {name} is unreadable (truncated or corrupt? {reason}")
    assert line.endswith("); copy or download the model again")
    assert not (tmp_path / "runs").exists()


# 14. A YAML syntax error (a tab): the file, line and column.


@pytest.mark.parametrize("command", ["fit", "calibrate"])
def test_yaml_syntax_error_names_file_line_and_column(command, tiny_llama, tmp_path, capsys):
    config = tmp_path / "tabbed.yaml"
    config.write_text("trainer:\n  max_steps: 2\n\tlimit_val_batches: 0\n")
    args = [*tiny_args(tiny_llama, tmp_path / "runs"), "--config"] if command == "fit" else ["--config"]
    line = error_line([command, *args, str(config)], capsys)
    prefix = "error: calibrate: " if command == "calibrate" else "error: "
    assert line.startswith(f"{prefix}{config}:3:1: ") and line.endswith("; YAML indents with spaces, not tabs")
    config.write_text("trainer:\n  max_steps: [2\n")
    line = error_line(["fit", *tiny_args(tiny_llama, tmp_path / "runs"), f"--config={config}"], capsys)
    assert line.startswith(f"error: {config}:3:1: ") and "flow sequence" in line
    assert not (tmp_path / "runs").exists()


# 15. compare: a metric value that is not a number; calibrate: a trace line whose fields have the wrong type.


def evaluation_rows(correct: list[bool]) -> list[dict]:
    return [
        {"id": f"q{i}", "correct": c, "samples_correct": [c, True], "metrics": {"maj@2": float(c), "pass@2": 1.0}}
        for i, c in enumerate(correct)
    ]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("maj@2", "n/a", "field 'metrics.maj@2' must be a number, got 'n/a'"),
        ("pass@2", None, "field 'metrics.pass@2' must be a number, got None"),
        ("metrics", "0.5", "field 'metrics' must be an object of numbers, got '0.5'"),
        ("samples_correct", [1, 0], "field 'samples_correct' must be a non-empty list of true/false, got [1, 0]"),
    ],
)
def test_compare_non_numeric_metric_names_file_line_and_field(field, value, expected, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", evaluation_rows([True, False, True, True, False, True]))
    rows = evaluation_rows([True, True, False, True, False, False])
    if field in ("metrics", "samples_correct"):
        rows[4][field] = value
    else:
        rows[4]["metrics"][field] = value
    b = write_jsonl(tmp_path / "b.jsonl", rows)
    out = tmp_path / "out"
    line = error_line(["compare", str(a), str(b), "--output_dir", str(out)], capsys)
    assert line == f"error: {b}:5: {expected}"
    assert not out.exists()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("top_ids", 5, "field 'top_ids' must be a list of token ids, got 5"),
        ("top_ids", ["a", "b"], "field 'top_ids' must be a list of token ids, got ['a', 'b']"),
        ("gt", "7", "field 'gt' must be a token id, got '7'"),
        ("top_probs", 0.5, "field 'top_probs' must be a list of probabilities, got 0.5"),
    ],
)
def test_calibrate_trace_field_of_wrong_type_names_file_line_and_field(field, value, expected, tmp_path, capsys):
    probs = [f"{0.5 ** (rank + 1):.8f}" for rank in range(4)]
    lines = [{"gt": i % 4, "top_ids": list(range(4)), "top_probs": probs} for i in range(10)]
    lines[3][field] = value
    traces = write_jsonl(tmp_path / "traces.jsonl", lines)
    out = tmp_path / "calibration"
    line = error_line(["calibrate", "--traces", str(traces), "--output_dir", str(out), "--ranks", "4"], capsys)
    assert line == f"error: {traces}:4: {expected}"
    assert not out.exists()


# 16. calibrate's temperature; outputs of calibrate and compare as a set (all or none, never two runs mixed).


def test_calibrate_refuses_a_temperature_that_does_not_sample(tmp_path, capsys):
    traces = tmp_path / "traces.jsonl"
    synthetic_traces(traces, a=-0.3, b=1.0, per_bin=50)
    out = tmp_path / "calibration"
    args = ["calibrate", "--traces", str(traces), "--output_dir", str(out), "--ranks", "4"]
    for temperature in (0.0, -1.0):
        line = error_line([*args, "--temperature", str(temperature)], capsys)
        expected = f"temperature must be a finite number > 0 (the configs sample), got {temperature}"
        assert line == f"error: calibrate: {expected}"
    for temperature in (float("nan"), float("inf")):  # the command line refuses these already; the function too
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            calibrate_command.calibrate(str(traces), str(out), ranks=4, temperature=temperature)
    assert not out.exists()


def test_calibrate_rerun_without_an_eps_fit_removes_the_stale_eps_config(tmp_path, capsys):
    out = tmp_path / "calibration"
    rising, falling = tmp_path / "rising.jsonl", tmp_path / "falling.jsonl"
    synthetic_traces(rising, a=-0.3, b=1.0, per_bin=200)
    synthetic_traces(falling, a=-1.0, b=-0.2, per_bin=200)  # accuracy falls with probability: B < 0
    first = calibrate_command.calibrate(str(rising), str(out), ranks=4)
    assert first["fit"]["B"] > 0 and (out / "calibrated_eps.yaml").is_file()
    capsys.readouterr()
    second = calibrate_command.calibrate(str(falling), str(out), ranks=4)
    assert second["fit"]["B"] <= 0
    printed = capsys.readouterr().out
    assert "no calibrated_eps.yaml (cal_acc needs B > 0); removed the earlier run's calibrated_eps.yaml" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["calibrated_topk.yaml", "calibration.json", "calibration_heatmap.png"]
    assert json.loads((out / "calibration.json").read_text())["traces"] == str(falling)
    assert f"from {falling} " in (out / "calibrated_topk.yaml").read_text()


def test_calibrate_and_compare_write_all_outputs_or_none(tmp_path, monkeypatch):
    traces = tmp_path / "traces.jsonl"
    synthetic_traces(traces, a=-0.3, b=1.0, per_bin=50)
    a = write_jsonl(tmp_path / "a.jsonl", evaluation_rows([True, False, True, True]))
    b = write_jsonl(tmp_path / "b.jsonl", evaluation_rows([True, True, False, True]))
    calibration, comparison = tmp_path / "calibration", tmp_path / "compare"
    calibrate_command.calibrate(str(traces), str(calibration), ranks=4)
    compare_command.compare([str(a), str(b)], str(comparison))
    before = {p: p.read_bytes() for folder in (calibration, comparison) for p in folder.iterdir()}
    assert len(before) == 7

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(calibrate_command, "heatmap", broken_plot)
    monkeypatch.setattr(compare_command, "plot", broken_plot)
    synthetic_traces(traces, a=-0.5, b=1.5, per_bin=50)  # another run, whose outputs would differ
    with pytest.raises(RuntimeError, match="plotting failed"):
        calibrate_command.calibrate(str(traces), str(calibration), ranks=4, threshold=0.2)
    with pytest.raises(RuntimeError, match="plotting failed"):
        compare_command.compare([str(b), str(a)], str(comparison))
    assert {p: p.read_bytes() for folder in (calibration, comparison) for p in folder.iterdir()} == before
    with pytest.raises(RuntimeError, match="plotting failed"):
        compare_command.compare([str(a), str(b)], str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


def test_write_file_set_leaves_the_folder_as_it_was_when_a_file_fails(tmp_path):
    (tmp_path / "one.txt").write_text("old one\n")
    with pytest.raises(TypeError):
        write_file_set(tmp_path, {"one.txt": "new one\n", "two.txt": 2})  # type: ignore[dict-item]
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("one.txt", "old one\n")]
    assert write_file_set(tmp_path, {"two.txt": b"2\n"}, stale=["one.txt", "three.txt"]) == ["one.txt"]
    assert [(p.name, p.read_text()) for p in tmp_path.iterdir()] == [("two.txt", "2\n")]


# 17. A Unicode minus sign ("−5", U+2212) is a minus.


def test_unicode_minus_is_extracted_as_a_minus():
    assert extract_gsm8k("The temperature drops to \u22125 degrees.") == "-5"
    assert extract_gsm8k("She owes \u22121,200 dollars.\n#### \u22121,200") == "-1200"
    assert extract_gsm8k("The answer is \u22123.50") == "-3.5"
    assert extract_gsm8k("<answer>\u22127</answer>") == "-7"
    assert extract_gsm8k("It takes 5\u201310 minutes") == "10"  # an en dash is a range, not a minus
    assert numbers_equivalent("\u22125", "-5") and not numbers_equivalent("\u22125", "5")
    assert score_completion("gsm8k", "So x = \u22124.", "-4") == ("-4", True)
    assert score_completion("gsm8k", "So x = -4.", "\u22124") == ("-4", True)  # a gold answer written with U+2212
    assert extract_math("\\boxed{\u2212\\frac{1}{2}}") == "-\\frac{1}{2}"
    assert extract_math("The answer is \u22122.") == "-2"
    assert math_equivalent("\u2212\\frac12", "-\\frac{1}{2}")


# 18. Quiet start: bitsandbytes' kernel-download warning is dropped; the logger's other messages are kept.


def test_bitsandbytes_kernel_warning_is_dropped_and_other_warnings_kept(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            "Kernel repository ... Set trust_remote_code=True ...",
        )
        logger.warning("a real bitsandbytes warning")
    assert [record.getMessage() for record in caplog.records] == ["a real bitsandbytes warning"]


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["0", "1"])
def test_help_prints_nothing_before_our_own_output(offline):
    """Online, bitsandbytes warns that it could not fetch its kernel; offline (HF_HUB_OFFLINE=1), `kernels` also
    warns that it skips the publisher check. Neither is printed."""
    env = {**os.environ, "HF_HUB_OFFLINE": offline}
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "--help"], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("companion commands (python cli.py COMMAND --help):\n")
