"""Upstream code 003's confidence-bin figure: majority-voted accuracy vs k from one `test` run per confidence bin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_main

from commands.confidence_bins import confidence_bins
from core.errors import UserInputError

# Three samples of one question (gold 7): extracted answers, their correctness, and maj@1..3 worked out by hand
# (samples without an answer do not vote; a tie goes to the answer seen first).
PATTERNS = {
    "all7": (["7", "7", "7"], [True, True, True], [1, 1, 1]),
    "late": (["3", "7", "7"], [False, True, True], [0, 0, 1]),  # k=2: 3 and 7 tie, 3 seen first
    "gap": (["7", None, "5"], [True, False, False], [1, 1, 1]),  # k=3: 7 and 5 tie, 7 first
    "none": ([None, "5", "7"], [False, False, True], [0, 0, 0]),  # k=1: nothing votes
    "wrong": (["2", "7", "2"], [False, True, False], [0, 0, 0]),
    "early": (["7", "2", "2"], [True, False, False], [1, 1, 0]),
}
RUNS = {  # bin -> the patterns of questions q1, q2, and the mean maj@1..3 over them, by hand
    1: (("all7", "late"), [0.5, 0.5, 1.0]),
    2: (("late", "none"), [0.0, 0.0, 0.5]),
    3: (("gap", "early"), [1.0, 1.0, 0.5]),
    4: (("none", "wrong"), [0.0, 0.0, 0.0]),
    5: (("all7", "gap"), [1.0, 1.0, 1.0]),
    6: (("early", "wrong"), [0.5, 0.5, 0.0]),
    7: (("late", "early"), [0.5, 0.5, 0.5]),
    8: (("all7", "none"), [0.5, 0.5, 0.5]),
    9: (("wrong", "gap"), [0.5, 0.5, 0.5]),
    10: (("late", "gap"), [0.5, 0.5, 1.0]),
}


def write_run(folder: Path, number: int | None, patterns: tuple[str, ...]) -> Path:
    """A `test` run folder: config.yaml with the bin, samples/test_step0.jsonl with repeated samples."""
    decoding = {"temperature": 1.0} | ({"confidence_bin_only": number} if number is not None else {})
    (folder / "samples").mkdir(parents=True)
    config = {"model": {"init_args": {"generation": {"repeats": 3, "decoding": decoding}}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for index, name in enumerate(patterns, start=1):
        predictions, correct, _ = PATTERNS[name]
        rows.append({"id": f"q{index}", "question": f"Q{index}", "completions": ["..."] * 3, "predictions": predictions,
                     "samples_correct": correct, "prediction": None, "answer": "7", "correct": False})  # fmt: skip
    (folder / "samples/test_step0.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_figure_and_json_from_ten_runs_have_the_hand_computed_curves(tmp_path):
    runs = [str(write_run(tmp_path / f"bin{n}", n, patterns)) for n, (patterns, _) in reversed(RUNS.items())]
    out = tmp_path / "figure"
    assert run_main(["confidence_bins", *runs, "--output_dir", str(out)]) == 0
    result = json.loads((out / "confidence_bins.json").read_text())
    assert result["k_values"] == [1, 2, 3]
    assert [entry["bin"] for entry in result["bins"]] == list(range(1, 11))  # sorted by bin, whatever the order given
    assert {entry["bin"]: entry["accuracies"] for entry in result["bins"]} == {n: acc for n, (_, acc) in RUNS.items()}
    assert result["bins"][0]["label"] == "[0.0, 0.1)" and result["bins"][9]["label"] == "[0.9, 1.0]"
    assert all(entry["questions"] == 2 for entry in result["bins"])
    assert (out / "confidence_bins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    two = confidence_bins(runs[:2], str(tmp_path / "two"), max_k=2)
    assert [entry["accuracies"] for entry in two["bins"]] == [RUNS[9][1][:2], RUNS[10][1][:2]]


def test_bad_runs_are_one_line(tmp_path):
    first = write_run(tmp_path / "a", 3, ("all7", "late"))
    with pytest.raises(UserInputError, match=r"confidence bin 3 is also the bin of"):
        confidence_bins([str(first), str(write_run(tmp_path / "b", 3, ("all7", "late")))], str(tmp_path / "o"))
    with pytest.raises(UserInputError, match=r"c/config\.yaml: cannot read .*confidence_bin_only"):
        confidence_bins([str(write_run(tmp_path / "c", None, ("all7", "late")))], str(tmp_path / "o"))
    with pytest.raises(UserInputError, match=r"its questions differ .* \(e\.g\. id 'q2'\)"):
        confidence_bins([str(first), str(write_run(tmp_path / "d", 4, ("all7",)))], str(tmp_path / "o"))
    with pytest.raises(UserInputError, match=r"max_k must be in 1\.\.3"):
        confidence_bins([str(first)], str(tmp_path / "o"), max_k=4)
    assert not (tmp_path / "o").exists()
