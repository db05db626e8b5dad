"""Code shared by the tests, imported one way: `from helpers import ...` (pytest puts tests/ on sys.path; the
configs of CLI runs name the callbacks below by class_path, `helpers.CrashAtStep`). Tests import nothing from one
another or from conftest."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from core.tensors import pad_sequences
from models.loading import ModelSpec, load_model, load_tokenizer
from models.synthetic import bpe_tokenizer, random_model, save_random_model

REPO = Path(__file__).resolve().parents[1]


def tiny_args(model: Path, save_dir: Path, *extra: str) -> list[str]:
    """`cli.py fit` arguments of README command 1's configs on a tiny model: 16 examples, 4 validation questions,
    8 new tokens, the paper's planning-token counts and LoRA rate, logs under `save_dir`."""
    return [
        "--config", str(REPO / "configs/planning_gsm8k.yaml"),
        "--config", str(REPO / "configs/presets/cpu_demo.yaml"),
        "--model.init_args.backbone.name", str(model),
        "--data.train_limit", "16", "--data.val_size", "4", "--data.eval_batch_size", "4",
        "--data.max_length", "1024",
        "--model.init_args.generation.max_new_tokens", "8",
        # the paper's token counts and rate (the CPU preset trains one token per key at 1e-3 for the embedded model)
        "--model.init_args.planning.n_prefix", "3", "--model.init_args.planning.n_special", "2",
        "--model.init_args.optimizer.init_args.lr", "2e-4",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def run_main(args: list[str]) -> int:
    """`cli.main(args)` in this process; its exit code."""
    from cli import main  # here: a CLI run that names a callback below imports this module, and runs cli as __main__

    try:
        main(args)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def run_cli(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`cli.py` in a subprocess from the repository root; fails the test with its stderr unless it exits 0."""
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_dir(save_dir: Path, version: int = 0) -> Path:
    """The run directory of a `tiny_args` run (configs/planning_gsm8k.yaml's name) under `save_dir`."""
    return save_dir / "planning_gsm8k" / f"version_{version}"


def trainable_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The state dict a Lightning checkpoint holds (the trainable weights)."""
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_final_weights(straight: Path, resumed: Path) -> None:
    """The run under `resumed` (a save_dir) ended with the trainable weights of the one under `straight`, bit for bit
    (each run's `last.ckpt`)."""
    expected = trainable_state(run_dir(straight) / "checkpoints/last.ckpt")
    actual = trainable_state(run_dir(resumed) / "checkpoints/last.ckpt")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def error_lines(capsys) -> list[str]:
    """The `error: ...` lines `cli.main` printed to stderr (beside the log lines)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file (gzip-compressed when it ends in .gz); blank lines skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as file:
        return [json.loads(line) for line in file if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """`rows` as a JSONL file at `path` (its folder created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 512) trained on GSM8K text, with a ChatML chat template."""
    return bpe_tokenizer(REPO / "data/gsm8k/train.jsonl")


def build_tiny_model(kind: str, vocab_size: int, **overrides):
    """A 2-layer random-weight Llama, Qwen2 or Gemma2 (hidden 64) from a config, seeded."""
    return random_model(kind, vocab_size, **overrides)


def save_tiny(folder: Path, kind: str, **overrides) -> Path:
    """A tiny random model of `kind` and the tiny tokenizer saved in `folder`."""
    return save_random_model(folder, kind, build_tiny_tokenizer(), **overrides)


def load_frozen(folder: Path):
    """The model of a folder in eval mode without gradients, and its tokenizer."""
    spec = ModelSpec(name=str(folder))
    return load_model(spec).requires_grad_(False).eval(), load_tokenizer(spec)


PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April. How many clips?\nAnswer:",
    "Question: Weng earns $12 an hour.\nAnswer:",
    "Question: Betty is saving money for a new wallet which costs $100. She has half.\nAnswer:",
    "Question: 2+2?\nAnswer:",
]


def batch_of(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask of `prompts`."""
    ids = [tokenizer(p).input_ids for p in prompts]
    return pad_sequences(ids, tokenizer.pad_token_id, "left"), pad_sequences([[1] * len(i) for i in ids], 0, "left")


def fake_commands(folder: Path, names: tuple[str, ...]) -> Path:
    """Executables that append their name and arguments (one JSON line) to folder/calls.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        script = folder / name
        script.write_text(
            "#!/usr/bin/env bash\n"
            f'python3 -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' {name} "$@" >> "{folder}/calls.jsonl"\n'
            'echo "Submitted batch job 1000$(wc -l < "' + str(folder) + '/calls.jsonl")"\n'
        )
        script.chmod(0o755)
    return folder


def synthetic_traces(path: Path, a: float, b: float, per_bin: int = 20000, ranks: int = 4) -> dict:
    """Rank-log traces at `path` whose gold sits at rank r with probability exactly 10^a * p_r^b (p_r: that rank's
    prob); the expected accuracy and mean probability per confidence bin and rank."""
    rng = np.random.default_rng(0)
    lines, expected = [], {"acc": np.zeros((10, ranks)), "mu": np.zeros((10, ranks))}
    for bin_ in range(10):
        top1 = 0.05 + 0.1 * bin_
        probs = top1 * 0.5 ** np.arange(ranks)
        hits = np.round(per_bin * 10**a * probs**b).astype(int)
        gold = np.concatenate([np.full(h, r + 1) for r, h in enumerate(hits)] + [np.zeros(per_bin - hits.sum())])
        rng.shuffle(gold)
        expected["acc"][bin_], expected["mu"][bin_] = hits / per_bin, probs
        ids = list(range(100, 100 + ranks))
        for g in gold.astype(int):
            gt = ids[g - 1] if g else 7
            lines.append({"gt": gt, "top_ids": ids, "top_probs": [f"{p:.8f}" for p in probs]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return expected


class PoisonWeightsAtStep(L.Callback):
    """Sets one trainable weight to NaN before training step `step`, so its loss is non-finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            parameter = next(p for p in module.parameters() if p.requires_grad)
            with torch.no_grad():
                parameter.fill_(float("nan"))


class SaveTrainableWeights(L.Callback):
    """At the end of training, every process saves its trainable parameters to `folder/rank<N>.pt`."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, module) -> None:
        weights = {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}
        os.makedirs(self.folder, exist_ok=True)
        torch.save(weights, os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class CrashAtStep(L.Callback):
    """Raises before training step `step`: a simulated crash (pre-emption, OOM, node failure)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class ReportSteps(L.Callback):
    """After every training batch, writes the global step to `path` and sleeps `delay` seconds, so a test can
    signal the process while it trains."""

    def __init__(self, path: str, delay: float = 0.3) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        with open(self.path, "w") as file:
            file.write(str(trainer.global_step))
        time.sleep(self.delay)


class AssertTrainMode(L.Callback):
    """Fails a training step that starts with the model (or any of its layers) in eval mode."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        assert module.model.training and all(layer.training for layer in module.model.modules())


class ReportEvaluation(L.Callback):
    """After every validation or test batch, writes "<global step> <batch index>" to `path` and sleeps `delay`
    seconds, so a test can signal the process while it evaluates."""

    def __init__(self, path: str, delay: float = 0.5) -> None:
        self.path, self.delay = path, delay

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        with open(self.path, "w") as file:
            file.write(f"{trainer.global_step} {batch_idx}")
        time.sleep(self.delay)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.on_validation_batch_end(trainer, module, outputs, batch, batch_idx, dataloader_idx)


class FillDiskAtEpochEnd(L.Callback):
    """At the end of the epoch that ends at training step `step`, before that epoch's checkpoints are saved, fills
    the filesystem of `path` with the file `path` until it is full (a real ENOSPC for the writes that follow)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.global_step != self.step:
            return
        chunk = b"\0" * (1 << 16)
        with open(self.path, "wb", buffering=0) as file:
            try:
                while file.write(chunk):
                    pass
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


class KillDuringExport(L.Callback):
    """Kills its own process with SIGKILL (`kill -9`) in the middle of the first epoch export: after the model's
    files are in the export's staging folder, before it is renamed to `epoch_N/`."""

    def setup(self, trainer, module, stage) -> None:
        import callbacks.export as export

        original = export.export_model

        def export_then_die(*args, **kwargs) -> None:
            original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        export.export_model = export_then_die
