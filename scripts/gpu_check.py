"""One prepared device check: the project's GPU paths, each item timed, with its peak GPU memory, in one JSON report.

    python scripts/gpu_check.py                 # on a CUDA machine: under 8 minutes on one H100 / H200
    python scripts/gpu_check.py --dry-run       # the same items on the CPU with tiny shapes (CI runs this; the
                                                # *_matches_cpu items then compare the CPU with itself)
    python scripts/gpu_check.py --only slot_bf16 greedy_fp32_matches_cpu

Report: benchmarks/results/gpu_check.json (`--output`), and a table printed last. Each item runs in its own
process (`--item NAME`) with a timeout, so a crash, a hang or an out-of-memory error fails that item alone; an
item whose requirement is missing (bitsandbytes, vLLM) is "skipped" with the reason. Items run the project's own
entry points (`cli.build_cli` for fit / test, the companion commands, `evaluation.generation.generate`) on random-
weight models built from configs (`models/synthetic.py`, a BPE tokenizer trained on the bundled GSM8K text):
"small" is a ~100M Llama, "large" a ~1B Qwen2, "tiny" the 2-layer test model. Nothing is downloaded.

On the device machine (torch 2.11 + CUDA 13, transformers, peft, lightning, torchmetrics, tensorboard and
accelerate installed; no registry, no hub; 64 MiB travels per call), carry the few missing wheels: here, once,
`bash scripts/gpu_wheels.sh [--qlora]` saves them (pinned, ~2 MiB; 43 MiB with bitsandbytes) to the ignored `.whl/`.
Then one device call, carrying `.whl`, with a timeout of 600 s:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \\
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \\
      && python3 scripts/gpu_check.py --output $OUT/gpu_check.json --workdir /tmp/gpu_check

and copy $OUT/gpu_check.json to benchmarks/results/gpu_check.json. To add an item (the vLLM engine, a fused loss),
write a function `item(ctx) -> dict` below and add it to ITEMS; raise `Skip("why")` when its requirement is absent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (kind, config) of the models the items use; the dry run gives every name the tiny shape
SHAPES = {
    "small": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                            num_key_value_heads=4, tie_word_embeddings=True)),  # ~100M
    "large": ("qwen2", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=16,
                            num_key_value_heads=4, tie_word_embeddings=False)),  # ~1B
    "tiny": ("llama", {}),
}  # fmt: skip


class Skip(Exception):
    """An item whose requirement is absent on this machine: reported as skipped with the reason."""


@dataclass
class Context:
    """What every item gets: where to work, the models, and the size of the run (dry or real)."""

    workdir: Path
    dry: bool

    @property
    def accelerator(self) -> str:
        return "cpu" if self.dry else "gpu"

    def model(self, name: str) -> str:
        return str(self.workdir / "models" / ("tiny" if self.dry else name))

    def n(self, real: int, dry: int) -> int:
        """`real` on the device, `dry` in the dry run."""
        return dry if self.dry else real

    def run_cli(self, subcommand: str, configs: list[str], *overrides: str, name: str):
        """`cli.py SUBCOMMAND --config ...` in this process, logging to workdir/runs/NAME; returns the CLI object."""
        from cli import build_cli

        args = [subcommand]
        for config in configs:
            args += ["--config", str(REPO / "configs" / config)]
        args += ["--trainer.logger.init_args.save_dir", str(self.workdir / "runs" / name),
                 "--trainer.enable_progress_bar", "false", "--trainer.accelerator", self.accelerator,
                 *overrides]  # fmt: skip
        return build_cli(args)

    def run_dir(self, name: str) -> Path:
        """The newest run directory under workdir/runs/NAME (a rerun in the same workdir adds a version)."""
        runs = (self.workdir / "runs" / name).glob("*/version_*")
        return max(runs, key=lambda path: int(path.name.removeprefix("version_")))


def fit_args(ctx: Context, model: str, steps: int) -> list[str]:
    return ["--model.init_args.backbone.name", ctx.model(model), "--trainer.max_steps", str(steps),
            "--trainer.max_epochs", "1", "--data.train_limit", str(steps * 4), "--data.batch_size", "4",
            "--trainer.accumulate_grad_batches", "1", "--data.val_size", "8",
            "--data.max_length", str(ctx.n(512, 1024)),
            "--model.init_args.generation.max_new_tokens", str(ctx.n(32, 4)), "--trainer.val_check_interval", "1.0",
            "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def metrics_of(cli) -> dict:
    return {key: round(float(value), 6) for key, value in cli.trainer.callback_metrics.items()}


def export_reloads(ctx: Context, run: Path, base: str) -> dict:
    """The run's epoch_0 export loads with the project's loader and generates from a planning-token prompt."""
    import torch

    from evaluation.generation import GenerationSpec, generate
    from models.loader import load_trained
    from models.loading import ModelSpec

    export = run / "epoch_0"
    trained = load_trained(ModelSpec(name=base), str(export))
    model, tokenizer = trained.model.to(device(ctx)), trained.tokenizer
    prompt = tokenizer(["Question: 2+3?\nAnswer: <prefix_0><prefix_1><prefix_2>"], return_tensors="pt").to(device(ctx))
    text = generate(model, tokenizer, prompt.input_ids, prompt.attention_mask, GenerationSpec(max_new_tokens=8))[0]
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise AssertionError(f"{export} holds non-finite weights")
    return {"export": str(export), "export_generates": text, "export_step": trained.step}


def device(ctx: Context) -> str:
    return "cpu" if ctx.dry else "cuda"


def compared(ctx: Context) -> str:
    """What a *_matches_cpu item compared, for its report: in the dry run, the CPU with itself."""
    return "cpu with cpu (dry run: the comparison runs, no device is checked)" if ctx.dry else "cuda with cpu"


def lora_planning_bf16(ctx: Context) -> dict:
    """LoRA + planning tokens (the main config), bf16-true, a few dozen steps, epoch_0 export reloaded."""
    steps = ctx.n(40, 3)
    cli = ctx.run_cli("fit", ["planning_gsm8k.yaml"], *fit_args(ctx, "small", steps),
                      "--trainer.precision", "bf16-true", name="lora")  # fmt: skip
    run = ctx.run_dir("lora")
    if cli.trainer.global_step != steps:
        raise AssertionError(f"trained {cli.trainer.global_step} steps, expected {steps}")
    return {"steps": steps, **metrics_of(cli), **export_reloads(ctx, run, ctx.model("small"))}


def full_bf16(ctx: Context) -> dict:
    """Full fine-tuning of the ~1B model in bf16-true."""
    steps = ctx.n(20, 2)
    cli = ctx.run_cli("fit", ["planning_gsm8k.yaml"], *fit_args(ctx, "large", steps), "--model.init_args.mode",
                      "full", "--trainer.precision", "bf16-true", "--export.enabled", "false", name="full")  # fmt: skip
    return {"steps": cli.trainer.global_step, **metrics_of(cli)}


def qlora_nf4(ctx: Context) -> dict:
    """QLoRA (configs/presets/qlora.yaml): NF4 base through bitsandbytes, LoRA + planning rows, export."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise Skip("bitsandbytes is not importable (carry its wheel, see the docstring)")
    if ctx.dry:  # bitsandbytes' CPU kernels; only the CUDA device choice is replaced (this process only)
        import models.loading

        models.loading.quantized_device_map = lambda spec: {"": "cpu"}
    steps = ctx.n(20, 2)
    cli = ctx.run_cli("fit", ["planning_gsm8k.yaml", "presets/qlora.yaml"], *fit_args(ctx, "small", steps),
                      "--trainer.devices", "1", name="qlora")  # fmt: skip
    return {
        "steps": cli.trainer.global_step,
        **metrics_of(cli),
        **export_reloads(ctx, ctx.run_dir("qlora"), ctx.model("small")),
    }


def fsdp_one_gpu(ctx: Context) -> dict:
    """configs/presets/gpu_fsdp.yaml on one GPU: FSDP2 sharding, bf16 weights, the gathered full-state export."""
    cli = ctx.run_cli("fit", ["planning_gsm8k.yaml", "presets/gpu_fsdp.yaml"], *fit_args(ctx, "small", ctx.n(10, 2)),
                      "--trainer.devices", "1", name="fsdp")  # fmt: skip
    return {
        "steps": cli.trainer.global_step,
        **metrics_of(cli),
        **export_reloads(ctx, ctx.run_dir("fsdp"), ctx.model("small")),
    }


def slot_args(ctx: Context, model: str, limit: int, tokens: int) -> list[str]:
    return ["--model.init_args.backbone.name", model, "--data.test_limit", str(limit),
            "--model.init_args.generation.max_new_tokens", str(tokens)]  # fmt: skip


def slot_rows(ctx: Context, name: str) -> dict[str, list[dict]]:
    folder = ctx.run_dir(name) / "samples/test_step0"
    summary = json.loads((folder / "summary.json").read_text())
    return {arm: [json.loads(line) for line in (folder / f"{arm}.jsonl").open()] for arm in summary["arms"]}


def slot_bf16(ctx: Context) -> dict:
    """SLOT (baseline + 5 iterations) on the small model in bf16-true: float64 cache, losses finite and lowered."""
    cli = ctx.run_cli("test", ["slot.yaml"], *slot_args(ctx, ctx.model("small"), ctx.n(16, 2), ctx.n(64, 4)),
                      "--trainer.precision", "bf16-true", name="slot_bf16")  # fmt: skip
    rows = slot_rows(ctx, "slot_bf16")["log_times_5_lr_0.1"]
    first, last = [r["slot_loss"][0] for r in rows], [r["slot_loss"][-1] for r in rows]
    if not all(b < a for a, b in zip(first, last, strict=True)):
        raise AssertionError(f"SLOT did not lower every prompt loss: {first} -> {last}")
    return {"questions": len(rows), **metrics_of(cli)}


def slot_fp32_matches_cpu(ctx: Context) -> dict:
    """Baseline and SLOT arms on the tiny model in fp32: the same completions and losses on the device as on the CPU."""
    args = slot_args(ctx, str(ctx.workdir / "models/tiny"), 4, 16)
    ctx.run_cli("test", ["slot.yaml"], *args, name="slot_device")
    from cli import build_cli

    build_cli(["test", "--config", str(REPO / "configs/slot.yaml"), *args, "--trainer.accelerator", "cpu",
               "--trainer.logger.init_args.save_dir", str(ctx.workdir / "runs/slot_cpu"),
               "--trainer.enable_progress_bar", "false"])  # fmt: skip
    device_rows, cpu_rows = slot_rows(ctx, "slot_device"), slot_rows(ctx, "slot_cpu")
    worst = 0.0
    for arm, rows in cpu_rows.items():
        for here, there in zip(rows, device_rows[arm], strict=True):
            if here["completion"] != there["completion"]:
                raise AssertionError(
                    f"{arm} {here['id']}: {there['completion']!r} on the device, {here['completion']!r}"
                )
            worst = max(worst, *(abs(a - b) for a, b in zip(here["slot_loss"], there["slot_loss"], strict=True)))
    if worst > 1e-4:
        raise AssertionError(f"SLOT losses differ by {worst:.2e} between the device and the CPU")
    return {"compared": compared(ctx), "arms": list(cpu_rows), "max_loss_difference": worst}


def greedy_fp32_matches_cpu(ctx: Context) -> dict:
    """Greedy `test` (decoding study prompt) on the small model in fp32: the same completions as on the CPU."""
    args = [
        "--model.init_args.backbone.name",
        ctx.model("small"),
        "--data.test_limit",
        str(ctx.n(8, 2)),
        "--data.lm_eval.max_gen_toks",
        str(ctx.n(48, 4)),
        "--model.init_args.rank_log",
        "null",
        "--data.max_length",
        "1536",
    ]  # the 5-shot prompt is longer with the dry run's 512-token vocabulary
    configs = ["decoding_gsm8k.yaml", "decoding/greedy.yaml"]
    ctx.run_cli("test", configs, *args, name="greedy_device")
    from cli import build_cli

    build_cli(["test", *(a for c in configs for a in ("--config", str(REPO / "configs" / c))), *args,
               "--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir",
               str(ctx.workdir / "runs/greedy_cpu"), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    texts = []
    for name in ("greedy_device", "greedy_cpu"):
        samples = ctx.run_dir(name) / "samples/test_step0.jsonl"
        texts.append([json.loads(line)["completion"] for line in samples.open()])
    if texts[0] != texts[1]:
        raise AssertionError(f"greedy completions differ: device {texts[0]} vs CPU {texts[1]}")
    return {"compared": compared(ctx), "questions": len(texts[0])}


def decoding_repeats(ctx: Context) -> dict:
    """The decoding study (min-p, repeated samples from one prefill, rank logs) with maj@k / pass@k."""
    repeats = ctx.n(16, 2)
    cli = ctx.run_cli("test", ["decoding_gsm8k.yaml", "decoding/min_p.yaml"], "--model.init_args.backbone.name",
                      ctx.model("small"), "--data.test_limit", str(ctx.n(16, 2)),
                      "--model.init_args.generation.repeats", str(repeats),
                      "--model.init_args.generation.at_k", f"[1,{repeats}]",
                      "--data.lm_eval.max_gen_toks", str(ctx.n(64, 4)), "--data.max_length", "1536",
                      name="decoding")  # fmt: skip
    metrics = metrics_of(cli)
    if f"test/maj@{repeats}" not in metrics or f"test/pass@{repeats}" not in metrics:
        raise AssertionError(f"no maj@k / pass@k in {sorted(metrics)}")
    ranks = next(ctx.run_dir("decoding").glob("samples/*_ranks.jsonl"))
    return {"repeats": repeats, "rank_lines": sum(1 for _ in ranks.open()), **metrics}


def likelihood_dynamics(ctx: Context) -> dict:
    """`cli.py dynamics` over the LoRA run's checkpoints (lora_planning_bf16 writes them) on the bundled pool."""
    from cli import run_command

    if not list((ctx.workdir / "runs/lora").glob("*/version_*/epoch_0")):
        raise AssertionError("needs the run of lora_planning_bf16, which did not finish")
    output = ctx.workdir / "dynamics"
    run_command("dynamics", ["--folder", str(ctx.run_dir("lora")), "--pool", str(REPO / "data/dynamics/pool.json"),
                             "--model.name", ctx.model("small"), "--output", str(output),
                             "--device", device(ctx)])  # fmt: skip
    summary = json.loads((output / "summary.json").read_text())
    return {"steps": summary["steps"], "types": sorted(summary["results_by_type"])}


def generation_throughput(ctx: Context) -> dict:
    """Generated tokens per second of `generate` (SDPA, bf16, the ~1B model) at batch 1, 8 and 64."""

    from core.tensors import pad_sequences
    from evaluation.generation import GenerationSpec, generate
    from models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(name=ctx.model("large"), dtype="bfloat16", attn_implementation="sdpa")
    model, tokenizer = load_model(spec).to(device(ctx)).eval(), load_tokenizer(spec)
    tokens = ctx.n(128, 4)
    generation = GenerationSpec(max_new_tokens=tokens, min_new_tokens=tokens)  # every row generates `tokens`
    questions = [json.loads(line)["question"] for line in (REPO / "data/gsm8k/test.jsonl").open()][:64]
    results = {}
    for batch in (1, 8, 64):
        ids = [tokenizer(q).input_ids for q in questions[:batch]]
        prompt = pad_sequences(ids, tokenizer.pad_token_id, "left").to(device(ctx))
        mask = pad_sequences([[1] * len(i) for i in ids], 0, "left").to(device(ctx))
        generate(model, tokenizer, prompt[:, -8:], mask[:, -8:], GenerationSpec(max_new_tokens=2))  # warm-up
        synchronize(ctx)
        start = time.perf_counter()
        generate(model, tokenizer, prompt, mask, generation)
        synchronize(ctx)
        results[f"tokens_per_s_batch{batch}"] = round(batch * tokens / (time.perf_counter() - start), 1)
    return results


def synchronize(ctx: Context) -> None:
    if not ctx.dry:
        import torch

        torch.cuda.synchronize()


def vllm_engine(ctx: Context) -> dict:
    """Greedy `test` with generation.engine vllm equals engine hf on the same questions (needs vllm)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise Skip("vllm is not importable (install the [vllm] extra on the device)")
    if ctx.dry:  # vLLM's CPU attention refuses the tiny model's head_dim 16 (it needs 32, 64, ...)
        raise Skip("dry run: the tiny model's head_dim is too small for vLLM's CPU backend")
    completions = {}
    for engine in ("hf", "vllm"):
        ctx.run_cli("test", ["decoding_gsm8k.yaml", "decoding/greedy.yaml"], "--model.init_args.backbone.name",
                    ctx.model("small"), "--data.test_limit", str(ctx.n(16, 2)), "--data.max_length", "1536",
                    "--data.lm_eval.max_gen_toks", str(ctx.n(64, 4)),
                    "--model.init_args.generation.engine", engine, name=f"engine_{engine}")  # fmt: skip
        samples = next(path for path in ctx.run_dir(f"engine_{engine}").glob("samples/test_step*.jsonl")
                       if not path.name.endswith("_ranks.jsonl"))  # fmt: skip
        completions[engine] = {row["id"]: row["completion"] for row in map(json.loads, samples.open())}
    same = sum(completions["vllm"][key] == text for key, text in completions["hf"].items())
    if same < len(completions["hf"]) - 1:
        raise AssertionError(f"engines agree on {same} of {len(completions['hf'])} questions")
    return {"questions": len(completions["hf"]), "identical": same}


def liger_fused_loss(ctx: Context) -> dict:
    """A short LoRA fit with Liger's fused linear cross-entropy (`model.init_args.loss liger`; needs liger-kernel)."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None or ctx.dry:
        raise Skip("liger-kernel is not importable, or no CUDA (dry run)")
    steps = ctx.n(20, 2)
    cli = ctx.run_cli("fit", ["planning_gsm8k.yaml"], *fit_args(ctx, "small", steps), "--trainer.precision",
                      "bf16-true", "--model.init_args.loss", "liger", name="liger")  # fmt: skip
    return {"steps": cli.trainer.global_step, **metrics_of(cli)}


ITEMS = {
    "lora_planning_bf16": (lora_planning_bf16, 150),
    "full_bf16": (full_bf16, 180),
    "qlora_nf4": (qlora_nf4, 90),
    "fsdp_one_gpu": (fsdp_one_gpu, 90),
    "slot_bf16": (slot_bf16, 60),
    "slot_fp32_matches_cpu": (slot_fp32_matches_cpu, 60),
    "greedy_fp32_matches_cpu": (greedy_fp32_matches_cpu, 90),
    "decoding_repeats": (decoding_repeats, 60),
    "likelihood_dynamics": (likelihood_dynamics, 60),
    "generation_throughput": (generation_throughput, 90),
    "vllm_engine": (vllm_engine, 30),
    "liger_fused_loss": (liger_fused_loss, 30),
}
"""name -> (function, timeout in seconds on the device; the dry run allows DRY_TIMEOUT each)."""
DRY_TIMEOUT = 300


def build_models(ctx: Context) -> dict[str, float]:
    """The models the items load, saved once under workdir/models (tiny only in the dry run); their sizes in GiB."""
    import torch

    from models.synthetic import bpe_tokenizer, save_random_model

    small_vocab = bpe_tokenizer(REPO / "data/gsm8k/train.jsonl", vocab_size=ctx.n(8192, 512), lines=ctx.n(4000, 400))
    for name in ("tiny",) if ctx.dry else ("tiny", "small", "large"):
        folder = ctx.workdir / "models" / name
        if not (folder / "config.json").is_file():
            tokenizer = bpe_tokenizer(REPO / "data/gsm8k/train.jsonl") if name == "tiny" else small_vocab
            kind, config = SHAPES[name]
            save_random_model(folder, kind, tokenizer, torch.bfloat16 if name == "large" else torch.float32, **config)
    sizes = {folder.name: sum(f.stat().st_size for f in folder.glob("*.safetensors")) for folder in (ctx.workdir /
             "models").iterdir()}  # fmt: skip
    return {name: round(size / 2**30, 3) for name, size in sizes.items()}


def run_item(name: str, ctx: Context, report: Path) -> None:
    """Run one item in this process and write its result (status, seconds, peak GPU memory, details) to `report`."""
    import torch

    function, _ = ITEMS[name]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result: dict = {"status": "pass"}
    try:
        result["details"] = function(ctx)
    except Skip as reason:
        result = {"status": "skipped", "reason": str(reason)}
    except Exception as error:  # reported, not raised: the next item still runs
        result = {"status": "fail", "reason": f"{type(error).__name__}: {str(error)[-1500:]}"}
    result["seconds"] = round(time.perf_counter() - start, 2)
    if torch.cuda.is_available():
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    report.write_text(json.dumps(result, default=str))


def run_all(ctx: Context, names: list[str], output: Path) -> dict:
    """Every item of `names` in its own process with its timeout; the report written to `output`."""
    from benchmarks.common import machine
    from core.io import write_json_atomic

    start = time.perf_counter()
    report = {"dry_run": ctx.dry, "machine": machine(), "gpu": gpu_name(), "model_gib": build_models(ctx)}
    report.update(build_models_s=round(time.perf_counter() - start, 1), items={})
    for name in names:
        timeout = DRY_TIMEOUT if ctx.dry else ITEMS[name][1]
        result_file = ctx.workdir / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--item", name, "--workdir", str(ctx.workdir)]
        command += ["--dry-run"] if ctx.dry else []
        item_start = time.perf_counter()
        log = ctx.workdir / f"{name}.log"
        try:
            with log.open("w") as handle:
                code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
            result = json.loads(result_file.read_text()) if result_file.is_file() else None
            if result is None:
                tail = log.read_text()[-1500:]
                result = {"status": "fail", "reason": f"exit code {code.returncode}, no result: {tail}"}
        except subprocess.TimeoutExpired:
            result = {"status": "fail", "reason": f"timed out after {timeout} s"}
        result.setdefault("seconds", round(time.perf_counter() - item_start, 2))
        report["items"][name] = result
        print(f"{name}: {result['status']} ({result['seconds']} s)", flush=True)
    report["total_s"] = round(time.perf_counter() - start, 1)
    write_json_atomic(output, report)
    print_table(report)
    return report


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def print_table(report: dict) -> None:
    print(f"\n{'item':<26}{'status':<9}{'seconds':>9}{'peak GiB':>10}  details / reason")
    for name, result in report["items"].items():
        peak = result.get("peak_gpu_gib")
        detail = result.get("reason") or json.dumps(result.get("details", {}))
        print(f"{name:<26}{result['status']:<9}{result['seconds']:>9}{'' if peak is None else peak:>10}  "
              f"{detail[:110].splitlines()[0] if detail else ''}")  # fmt: skip
    print(f"total {report['total_s']} s ({'dry run, CPU' if report['dry_run'] else report['gpu']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU with tiny shapes (a few steps)")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/gpu_check.json")
    parser.add_argument("--only", nargs="+", choices=list(ITEMS), help="run only these items")
    parser.add_argument("--workdir", type=Path, help="models and runs (default: a new temporary folder)")
    parser.add_argument("--item", choices=list(ITEMS), help=argparse.SUPPRESS)  # one item, in its own process
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to run the check on the CPU", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Context(workdir=workdir.resolve(), dry=args.dry_run)
    if args.item:
        run_item(args.item, ctx, workdir / f"{args.item}.json")
        return 0
    report = run_all(ctx, args.only or list(ITEMS), args.output)
    return 0 if all(r["status"] != "fail" for r in report["items"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
