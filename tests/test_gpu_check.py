"""scripts/gpu_check.py: the prepared device check, run on the CPU with tiny shapes (--dry-run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts/gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(gpu_check)


def test_a_failing_or_missing_requirement_item_is_reported_not_raised(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("kernel exploded")

    def absent(ctx):
        raise gpu_check.Skip("needs a library")

    monkeypatch.setitem(gpu_check.ITEMS, "broken", (broken, 1))
    monkeypatch.setitem(gpu_check.ITEMS, "absent", (absent, 1))
    ctx = gpu_check.Context(workdir=tmp_path, dry=True)
    for name in ("broken", "absent"):
        gpu_check.run_item(name, ctx, tmp_path / f"{name}.json")
    broken_result, absent_result = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("broken", "absent"))
    assert broken_result["status"] == "fail" and "RuntimeError: kernel exploded" in broken_result["reason"]
    assert absent_result == {"status": "skipped", "reason": "needs a library", "seconds": absent_result["seconds"]}


def test_without_cuda_the_real_check_refuses_to_start(capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA refusal")
    assert gpu_check.main(["--output", "/nonexistent/report.json"]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_run_reports_every_item(tmp_path):
    output = tmp_path / "gpu_check.json"
    command = [sys.executable, str(REPO / "scripts/gpu_check.py"), "--dry-run", "--workdir", str(tmp_path / "work"),
               "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["dry_run"] is True and list(report["items"]) == list(gpu_check.ITEMS)
    for name, item in report["items"].items():
        assert item["status"] in ("pass", "skipped"), (name, item)
        assert item["seconds"] >= 0 and (item["status"] == "pass" or item["reason"])
    items = report["items"]
    vllm_reason = "head_dim is too small" if importlib.util.find_spec("vllm") else "vllm is not importable"
    assert items["vllm_engine"]["status"] == "skipped" and vllm_reason in items["vllm_engine"]["reason"]
    assert items["liger_fused_loss"]["status"] == "skipped"
    assert items["greedy_fp32_matches_cpu"]["status"] == "pass" and items["fsdp_one_gpu"]["status"] == "pass"
    for name in ("slot_fp32_matches_cpu", "greedy_fp32_matches_cpu"):  # the report says what a dry run compared
        assert items[name]["details"]["compared"].startswith("cpu with cpu (dry run"), items[name]
    assert items["qlora_nf4"]["status"] == "pass" or "bitsandbytes" in items["qlora_nf4"]["reason"]
    assert items["likelihood_dynamics"]["details"]["steps"][0] == 0  # the base model, then the run's checkpoints
    assert set(items["generation_throughput"]["details"]) == {f"tokens_per_s_batch{b}" for b in (1, 8, 64)}
    assert "total" in result.stdout.splitlines()[-1]  # the table ends the output
