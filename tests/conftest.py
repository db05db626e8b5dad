"""Shared fixtures: tiny random-weight models and a tiny BPE tokenizer, built in-process (no download)."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub / datasets: they read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker per core (setup.cfg): one thread each, their subprocesses too
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
from helpers import REPO, build_tiny_tokenizer, save_tiny  # noqa: E402

LONGEST_FIRST = ("test_embedded.py", "test_vllm_engine.py", "test_gpu_check.py")
"""Files handed to the pytest-xdist workers first (README command 1 alone takes minutes), so none is left last."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of a tiny random Llama (tied embeddings) with the tiny tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Folder of a tiny random Qwen2 (untied embeddings) with the tiny tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def readme_main_job(tmp_path_factory) -> tuple[Path, str]:
    """README command 1 exactly as written (LoRA + planning tokens, the CPU demo preset), run once per session (by
    one pytest-xdist worker, the others wait for it): its run directory and what it printed. Tests that read it
    must not change its files."""
    import fcntl
    import subprocess
    import sys

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the workers' common folder
    save_dir, printed = shared / "readme-main-job", shared / "readme-main-job.stdout"
    with (shared / "readme-main-job.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not printed.is_file():
            readme = (REPO / "README.md").read_text()
            command = next(line for line in readme.splitlines() if line.startswith("bash scripts/setup.sh && "))
            arguments = command.split(".venv/bin/python cli.py ", 1)[1].split()
            extra = ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false"]
            result = subprocess.run([sys.executable, str(REPO / "cli.py"), *arguments, *extra], capture_output=True,
                                    text=True, cwd=REPO, timeout=1800)  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            printed.write_text(result.stdout)
    return save_dir / "planning_gsm8k/version_0", printed.read_text()
