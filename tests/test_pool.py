"""Dynamics pools with upstream's type names: from `select` (high / low / rand_llh_train), from `predict`
outputs (student_answer_*) and from evaluations of the base model and checkpoints (id_<q>_<label>_<verdict>)."""

from __future__ import annotations

import json

import pytest
from helpers import run_dir, run_main, tiny_args, write_jsonl

from commands.pool import SEED_INSTRUCTION, pool, selection_pool
from core.errors import UserInputError
from evaluation.likelihood import load_pool


def test_selection_pool_has_upstreams_types_and_the_selected_answers():
    kept = [
        {
            "record": {"instruction": "I", "input": "q1"},
            "high": "h1",
            "low": "l1",
            "rand": "b",
            "options": list("abcd"),
        },
        {"record": {"instruction": "I", "input": "q2"}, "high": "h2", "low": "l2", "rand": "x", "options": ["x", "y"]},
    ]
    entries = selection_pool(kept, questions=5, random_types=3, seed=0)
    types = [entry["type"] for entry in entries]
    assert types == ["high_llh_train", "low_llh_train", "rand_llh_train1", "rand_llh_train2", "rand_llh_train3",
                     "high_llh_train", "low_llh_train", "rand_llh_train1", "rand_llh_train2"]  # fmt: skip
    first = entries[:5]
    assert [e["output"] for e in first[:3]] == ["h1", "l1", "b"]  # what train_high / train_low / train_rand hold
    draws = [e["output"] for e in first[3:]]
    assert len(set(draws)) == 2 and set(draws) <= {"a", "c", "d"}  # other candidates, without replacement
    assert [e["output"] for e in entries[5:]] == ["h2", "l2", "x", "y"]  # q2 has one other candidate only
    assert all(set(e) == {"instruction", "input", "output", "type"} for e in entries)
    assert len(selection_pool(kept, questions=1, random_types=1, seed=0)) == 3


def test_pool_from_predict_and_evaluation_outputs_has_the_seed_types(tmp_path):
    greedy = write_jsonl(tmp_path / "greedy.jsonl", [
        {"id": "a", "question": "Q1", "completion": "g1", "prediction": "1", "answer": "1", "correct": True},
        {"id": "b", "question": "Q2", "completion": "g2", "prediction": "3", "answer": "2", "correct": False},
    ])  # fmt: skip
    sampled = write_jsonl(tmp_path / "sampled.jsonl", [{"id": "a", "question": "Q1", "completions": ["s1", "s2"]}])
    base = write_jsonl(tmp_path / "base.jsonl", [
        {"id": "b", "question": "Q2", "completion": "base answer", "correct": False},
        {"id": "a", "question": "Q1", "completion": "base answer 1", "correct": True},
    ])  # fmt: skip
    cp10 = write_jsonl(tmp_path / "cp10.jsonl", [
        {"id": "a", "question": "Q1", "completions": ["w", "r"], "samples_correct": [False, True], "correct": True},
        {"id": "c", "question": "Q3", "completions": ["r3", "w3"], "samples_correct": [True, False], "correct": False},
    ])  # fmt: skip
    cp5 = write_jsonl(
        tmp_path / "cp5.jsonl", [{"id": "b", "question": "Q2", "completion": "cp5 answer", "correct": True}]
    )
    out = tmp_path / "pool.json"
    evaluations = {"cp10": str(cp10), "base": str(base), "cp5": str(cp5)}
    pool(str(out), greedy=str(greedy), sampled=str(sampled), evaluations=evaluations)
    entries = json.loads(out.read_text())
    # Questions are numbered in order of first appearance over greedy, sampled, base, cp5, cp10: Q1 1, Q2 2, Q3 3.
    assert [(e["type"], e["input"], e["output"]) for e in entries] == [
        ("student_answer_greedy", "Q1", "g1"),
        ("student_answer_greedy", "Q2", "g2"),
        ("student_answer_non_greedy_1", "Q1", "s1"),
        ("student_answer_non_greedy_2", "Q1", "s2"),
        ("id_2_base_incorrect", "Q2", "base answer"),
        ("id_1_base_correct", "Q1", "base answer 1"),
        ("id_2_cp5_correct", "Q2", "cp5 answer"),
        ("id_1_cp10_incorrect", "Q1", "w"),  # the first sample, judged by its own correctness
        ("id_3_cp10_correct", "Q3", "r3"),
    ]
    assert {e["instruction"] for e in entries} == {SEED_INSTRUCTION}
    assert len(load_pool(out)) == 9  # what dynamics and the live callback read

    pool(str(out), evaluations=evaluations, questions=1, seed=0)
    assert len({e["input"] for e in json.loads(out.read_text())}) == 1


def test_pool_bad_input_is_one_line(tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"question": "Q", "completion": "x", "correct": True},
                                                 {"question": "Q2", "completion": "y"}])  # fmt: skip
    with pytest.raises(UserInputError, match=r"'step5' must be 'base' or 'cp<step>'"):
        pool(str(tmp_path / "p.json"), evaluations={"step5": str(rows)})
    with pytest.raises(UserInputError, match=rf"{rows}:2: needs 'correct'"):
        pool(str(tmp_path / "p.json"), evaluations={"base": str(rows)})
    with pytest.raises(UserInputError, match="at least one of"):
        pool(str(tmp_path / "p.json"))
    assert not (tmp_path / "p.json").exists()


@pytest.mark.slow
def test_pool_from_select_has_the_seed_types_and_trains_with_the_live_callback(tiny_llama, tmp_path):
    candidates = write_jsonl(tmp_path / "predictions.jsonl", [
        {"id": "q1", "question": "What is 3 + 4?", "answer": "7",
         "completions": ["3 + 4 = 7\n#### 7", "It is 7.", "Seven", "4 + 3 = 7 so 7", "3 and 4 make 7"]},
        {"id": "q2", "question": "What is 2 * 8?", "answer": "16", "completions": ["2 * 8 = 16\n#### 16", "16"]},
    ])  # fmt: skip
    out = tmp_path / "selection"
    assert run_main(["select", "--candidates", str(candidates), "--model.name", str(tiny_llama),
                     "--output_dir", str(out), "--pool_questions", "2"]) == 0  # fmt: skip
    entries = json.loads((out / "pool.json").read_text())
    q1 = [e for e in entries if e["input"] == "What is 3 + 4?"]
    assert [e["type"] for e in q1] == ["high_llh_train", "low_llh_train"] + [f"rand_llh_train{i}" for i in range(1, 6)]
    assert sorted(e["output"] for e in q1[2:]) == sorted(
        json.loads(candidates.read_text().splitlines()[0])["completions"]
    )
    for name, type_name in (("high", "high_llh_train"), ("low", "low_llh_train"), ("rand", "rand_llh_train1")):
        selected = {
            json.loads(line)["input"]: json.loads(line)["output"] for line in (out / f"train_{name}.jsonl").open()
        }
        assert all(e["output"] == selected[e["input"]] for e in entries if e["type"] == type_name)
    q2_types = [e["type"] for e in entries if e["input"] == "What is 2 * 8?"]
    assert q2_types == ["high_llh_train", "low_llh_train", "rand_llh_train1", "rand_llh_train2"]

    callback = json.dumps({"class_path": "callbacks.dynamics.LikelihoodDynamics",
                           "init_args": {"pool": str(out / "pool.json")}})  # fmt: skip
    args = tiny_args(tiny_llama, tmp_path, "--trainer.max_epochs", "1", f"--trainer.callbacks+={callback}")
    assert run_main(["fit", *args]) == 0
    live = json.loads((run_dir(tmp_path) / "dynamics/summary.json").read_text())
    assert live["steps"] == [0, 4]
    assert list(live["results_by_type"]) == list(dict.fromkeys(e["type"] for e in entries))
    assert len(live["results_by_type"]["rand_llh_train1"]["log_likelihood"][0]) == 2  # both questions, step 0
