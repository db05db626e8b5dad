"""LoRA fine-tuning cost: our Lightning fit vs HF Trainer + PEFT: real tokens/s, peak memory, final loss.

The arms train the same model on the same batches (the same examples, in the same order), each in its own process
(so its peak resident memory is its own), with the LoRA init seeded alike and PEFT's default LoRA dropout (0):
  hf-trainer    transformers.Trainer + peft.get_peft_model, same LoraConfig, AdamW lr, no clipping, defaults
  hf-trainer-thp  the same with THP_MEM_ALLOC_ENABLE=1, the allocator setting `cli.py` makes: how much of our
                arms' saving the setting alone would give HF Trainer
  ours-hf-loss  our fit with `loss: hf` (the model's own labels= loss over full logits)
  ours-chunked  our fit with `loss: chunked` (the head only at response positions, fp32 chunks)
  ours-packed   ours-chunked plus `data.packing: true`: each batch's examples in one row, attention computed
                example by example (models/packed_attention.py), so no padding is computed anywhere
  ours-*-no-thp  ours-chunked / ours-packed under PyTorch's default allocator: what our code saves without the
                setting, and what the setting costs in speed
Our arms run as `cli.py fit` does (THP_MEM_ALLOC_ENABLE=1 but in the -no-thp arms, lean gated MLPs).
Real tokens are the non-padding tokens; every arm trains the same ones, so equal losses mean equal training.
The FLOP figures count the work of a full-logit forward/backward (what the HF arm does) on the tokens.

Run from the repository root:  python benchmarks/train_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import REPO, machine  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from core.io import write_json_atomic  # noqa: E402
from datamodules.batching import EpochSeededRandomSampler, collate  # noqa: E402
from datamodules.reasoning import ReasoningDataModule  # noqa: E402
from lightning_modules.finetune import CausalLMFineTuner  # noqa: E402
from models.adapters import LoraSpec  # noqa: E402
from models.loading import ModelSpec, load_model, load_tokenizer  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "train_throughput.json"
LR = 2e-4  # CausalLMFineTuner's default AdamW learning rate
# PEFT's default LoraConfig dropout (0): with dropout, a packed row draws other masks than padded rows, so the
# arms would train on different noise and their losses could not be compared.
LORA = LoraSpec(dropout=0.0)
ARMS = (
    "hf-trainer",
    "hf-trainer-thp",
    "ours-hf-loss",
    "ours-chunked",
    "ours-packed",
    "ours-chunked-no-thp",
    "ours-packed-no-thp",
)
THP = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch at its first allocation: set in the environment of the arm's process
DEFAULT_ALLOCATOR_ARMS = ("hf-trainer", "ours-chunked-no-thp", "ours-packed-no-thp")
FORMULA = (
    "useful FLOPs = (4 N_frozen + 6 N_lora) * tokens + 12 n_layers hidden * sum(seq_len^2) over the real tokens\n"
    "and lengths: the work of a full-logit step (N_frozen: frozen Linear weights incl. lm_head, forward 2N +\n"
    "input-grad 2N; N_lora: adapters, 6N); an arm that skips work (prompt logits, padding) shows a higher rate."
)


class StepTimer:
    """Wall time and tokens of the steps after the warm-up: the clock starts when the last warm-up step ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.steps, self.start, self.end = warmup, 0, 0.0, 0.0
        self.real = self.padded = self.real_sq = self.padded_sq = 0
        self.shapes: list[list[int]] = []
        self.step_rates: list[float] = []  # real tokens / s of each timed step
        self.masks: list[torch.Tensor] = []  # filled by the HF arm's collator, in step order
        self.losses: list[float] = []  # training loss of every step
        self.threads = torch.get_num_threads()

    def step_end(self, mask: torch.Tensor) -> None:
        now, lengths = time.perf_counter(), mask.sum(dim=1)
        self.steps += 1
        self.shapes.append(list(mask.shape))
        self.threads = torch.get_num_threads()
        if self.steps == self.warmup:
            self.start = now
        elif self.steps > self.warmup:
            self.step_rates.append(int(lengths.sum()) / (now - (self.end or self.start)))
            self.end = now
            self.real += int(lengths.sum())
            self.padded += mask.numel()
            self.real_sq += int((lengths**2).sum())
            self.padded_sq += mask.shape[0] * mask.shape[1] ** 2


class LightningTimer(L.Callback):
    """Times our steps; seeds the RNG right before the model is built and before the first step, as HFTimer does."""

    def __init__(self, timer: StepTimer, seed: int) -> None:
        self.timer, self.seed = timer, seed

    def setup(self, trainer, module, stage: str) -> None:
        torch.manual_seed(self.seed)  # configure_model (LoRA init) runs next

    def on_train_batch_start(self, trainer, module, batch: dict, batch_idx: int) -> None:
        if trainer.global_step == 0:
            torch.manual_seed(self.seed)  # the LoRA dropout masks start from the same state in every arm

    def on_train_batch_end(self, trainer, module, outputs, batch: dict, batch_idx: int) -> None:
        self.timer.losses.append(float(outputs["loss"]))
        self.timer.step_end(batch["attention_mask"])


class HFTimer(TrainerCallback):
    def __init__(self, timer: StepTimer, seed: int) -> None:
        self.timer, self.seed = timer, seed

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.global_step == 0:
            torch.manual_seed(self.seed)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.timer.step_end(self.timer.masks[state.global_step - 1])


class LossRecordingTrainer(Trainer):
    """transformers.Trainer that keeps each step's loss (gradient accumulation 1: one micro-batch per step)."""

    def __init__(self, *args, timer: StepTimer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.timer = timer

    def training_step(self, *args, **kwargs) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        self.timer.losses.append(float(loss))
        return loss


def matmul_peak(size: int, repeats: int = 5, rounds: int = 3) -> float:
    """Best fp32 FLOP/s of `repeats` back-to-back [size x size] matmuls over `rounds` rounds, after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.mm(a, b)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def flop_terms(model: torch.nn.Module) -> dict:
    """The parameter counts FORMULA multiplies."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {
        "n_frozen": sum(m.weight.numel() for m in linears if not m.weight.requires_grad),
        "n_lora": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "n_layers": model.config.num_hidden_layers,
        "hidden": model.config.hidden_size,
    }


def summarise(timer: StepTimer, terms: dict, peak: float) -> dict:
    """One arm's figures over its timed steps."""
    seconds = timer.end - timer.start
    per_token, attention = 4 * terms["n_frozen"] + 6 * terms["n_lora"], 12 * terms["n_layers"] * terms["hidden"]
    flops_useful = (per_token * timer.real + attention * timer.real_sq) / seconds
    return {
        "timed_steps": timer.steps - timer.warmup,
        "real_tokens": timer.real,
        "padded_tokens": timer.padded,
        "padding_fraction": 1 - timer.real / timer.padded,
        "seconds": seconds,
        "real_tokens_per_s": timer.real / seconds,
        "median_step_real_tokens_per_s": statistics.median(timer.step_rates),
        "gflops_useful": flops_useful / 1e9,
        "fraction_of_peak_useful": flops_useful / peak,
        "threads": timer.threads,
        "batch_shapes": timer.shapes,
        "step_real_tokens_per_s": timer.step_rates,
        "losses": timer.losses,
        "final_loss": timer.losses[-1],
    }


def datamodule(args: argparse.Namespace, tokenizer, packing: bool = False) -> ReasoningDataModule:
    """Our datamodule, set up, its train split cut to exactly one epoch of the run's steps (the same for every arm),
    in random order (no length grouping: the HF Trainer's batches)."""
    needed = (args.warmup_steps + args.steps) * args.batch_size
    data = ReasoningDataModule(
        task="gsm8k",
        tokenizer=tokenizer,
        batch_size=args.batch_size,
        max_length=args.max_length,
        val_size=8,
        train_limit=2 * needed,  # spares: the datamodule drops examples whose prompt alone exceeds max_length
        group_by_length=False,
        packing=packing,
        seed=args.seed,
    )
    data.setup("fit")
    data.splits["train"] = data.splits["train"].select(range(min(needed, len(data.splits["train"]))))
    return data


def run_ours(args: argparse.Namespace, loss: str, packing: bool) -> tuple[StepTimer, dict]:
    """Our fit: CausalLMFineTuner (mode lora) + ReasoningDataModule under lightning.Trainer."""
    L.seed_everything(args.seed, verbose=False)
    module = CausalLMFineTuner(backbone=ModelSpec(name=args.model), mode="lora", lora=LORA, loss=loss)
    timer = StepTimer(args.warmup_steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup_steps + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[LightningTimer(timer, args.seed)],
    )
    trainer.fit(module, datamodule=datamodule(args, module.tokenizer, packing))
    return timer, flop_terms(module.model)


def run_hf(args: argparse.Namespace) -> tuple[StepTimer, dict]:
    """HF Trainer + PEFT on our datamodule's train split, in the order our arms use."""
    spec = ModelSpec(name=args.model)
    tokenizer = load_tokenizer(spec)
    train = datamodule(args, tokenizer).splits["train"]
    order = list(EpochSeededRandomSampler(train, seed=args.seed))  # epoch 0 of our arms
    examples = [{"input_ids": train[i]["input_ids"], "labels": train[i]["labels"]} for i in order]
    timer = StepTimer(args.warmup_steps)

    def recording_collate(features: list[dict]) -> dict:
        batch = collate(features, pad_id=tokenizer.pad_token_id)  # the same right padding as our datamodule
        timer.masks.append(batch["attention_mask"])
        return batch

    model = load_model(spec)
    torch.manual_seed(args.seed)  # as LightningTimer.setup: the same LoRA init
    model = get_peft_model(model, LORA.to_config())
    with tempfile.TemporaryDirectory() as output_dir:
        hf_args = TrainingArguments(  # defaults kept: no evaluation, 0 dataloader workers, weight decay 0
            output_dir=output_dir,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.warmup_steps + args.steps,
            learning_rate=LR,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_grad_norm=0.0,  # our fit does not clip either
            train_sampling_strategy="sequential",  # `examples` is already in our sampler's order
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_pin_memory=False,
            use_cpu=True,
            seed=args.seed,
        )
        LossRecordingTrainer(
            model=model,
            args=hf_args,
            train_dataset=examples,
            data_collator=recording_collate,
            callbacks=[HFTimer(timer, args.seed)],
            timer=timer,
        ).train()
    return timer, flop_terms(model)


def run_arm(args: argparse.Namespace) -> dict:
    """One arm in this process: its figures, and this process's peak resident memory."""
    if args.arm.startswith("hf-trainer"):
        timer, terms = run_hf(args)
    else:
        loss = "hf" if args.arm == "ours-hf-loss" else "chunked"
        timer, terms = run_ours(args, loss=loss, packing=args.arm.startswith("ours-packed"))
    figures = {key: value for key, value in vars(timer).items() if key != "masks"}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    return {"timer": figures, "terms": terms, "peak_rss_mb": peak_mb, THP: os.environ.get(THP)}


def arm_in_subprocess(args: argparse.Namespace, arm: str) -> dict:
    """`run_arm` in a fresh python process (its own peak memory and allocator setting), through a temporary JSON
    file."""
    env = {key: value for key, value in os.environ.items() if key != THP}
    env |= {} if arm in DEFAULT_ALLOCATOR_ARMS else {THP: "1"}
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "arm.json"
        command = [sys.executable, __file__, "--arm", arm, "--arm-output", str(output), *args.forwarded]
        subprocess.run(command, check=True, env=env)
        return json.loads(output.read_text())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, HF folder, .gguf file or hub id")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before them (>= 1)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512, help="long enough that GSM8K lengths vary")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul timed for the peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="arms to run (hf-trainer first)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 warm-up, 128 tokens")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--arm-output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.forwarded = sys.argv[1:]
    if args.quick:
        args.steps, args.warmup_steps, args.max_length, args.peak_size = 2, 1, 128, 1024
    if args.warmup_steps < 1 or args.steps < 1:
        parser.error("--steps and --warmup-steps must be >= 1")
    if "hf-trainer" not in args.arms:
        parser.error("--arms must include hf-trainer (the reference of every ratio)")
    return args


def targets(arms: dict) -> dict[str, bool]:
    """The issue's targets, for each of our arms that changes the training cost (not ours-hf-loss)."""
    checks = {}
    for name in ("ours-chunked", "ours-packed"):
        if name in arms:
            arm = arms[name]
            checks[f"{name} >= 1.2x hf-trainer real tokens/s"] = arm["ratio_vs_hf"] >= 1.2
            checks[f"{name} <= 0.7x hf-trainer peak memory"] = arm["memory_ratio_vs_hf"] <= 0.7
            checks[f"{name} final loss within 1e-5 of hf-trainer's"] = arm["final_loss_diff_vs_hf"] <= 1e-5
    return checks


def print_report(results: dict) -> None:
    columns = ["steps", "real tok", "padded", "pad %", "seconds", "real tok/s", "vs HF", "median vs HF"]
    columns += ["peak MB", "vs HF", "final loss", "|diff| HF"]
    print(f"\nfp32 matmul peak: {results['matmul_peak_flops'] / 1e9:.1f} GFLOP/s\n{FORMULA}\n")
    print(f"{'arm':<19}" + "".join(f"{name:>13}" for name in columns))
    for name, a in results["arms"].items():
        cells = [a["timed_steps"], a["real_tokens"], a["padded_tokens"], f"{a['padding_fraction']:.1%}"]
        cells += [f"{a['seconds']:.2f}", f"{a['real_tokens_per_s']:.1f}", f"{a['ratio_vs_hf']:.2f}x"]
        cells += [f"{a['median_ratio_vs_hf']:.2f}x", f"{a['peak_rss_mb']:.0f}", f"{a['memory_ratio_vs_hf']:.2f}x"]
        cells += [f"{a['final_loss']:.6f}", f"{a['final_loss_diff_vs_hf']:.1e}"]
        print(f"{name:<19}" + "".join(f"{cell:>13}" for cell in cells))
    print(f"\nevery arm trained the same examples in the same order: {results['same_examples']}")
    if results["noisy"]:
        print("WARNING: step times varied (another process on the CPU?): trust the median columns more")
    for target, passed in results["targets"].items():
        print(f"  {'PASS' if passed else 'FAIL'}  {target}")


def main() -> None:
    args = parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.arm:  # a child process: one arm
        Path(args.arm_output).write_text(json.dumps(run_arm(args)))
        return
    load = [os.getloadavg()[0]]
    peaks = [matmul_peak(args.peak_size)]
    runs = {arm: arm_in_subprocess(args, arm) for arm in args.arms}
    peaks.append(matmul_peak(args.peak_size))
    load.append(os.getloadavg()[0])
    arms = {}
    for name, run in runs.items():
        timer = StepTimer(args.warmup_steps)
        timer.__dict__.update(run["timer"])
        arms[name] = summarise(timer, run["terms"], max(peaks)) | {"peak_rss_mb": run["peak_rss_mb"], THP: run[THP]}
    hf = arms["hf-trainer"]
    for arm in arms.values():
        arm["ratio_vs_hf"] = arm["real_tokens_per_s"] / hf["real_tokens_per_s"]
        arm["median_ratio_vs_hf"] = arm["median_step_real_tokens_per_s"] / hf["median_step_real_tokens_per_s"]
        arm["memory_ratio_vs_hf"] = arm["peak_rss_mb"] / hf["peak_rss_mb"]
        arm["final_loss_diff_vs_hf"] = abs(arm["final_loss"] - hf["final_loss"])
        arm["max_step_loss_diff_vs_hf"] = max(abs(a - b) for a, b in zip(arm["losses"], hf["losses"], strict=True))
    wall_vs_median = [a["real_tokens_per_s"] / a["median_step_real_tokens_per_s"] for a in arms.values()]
    results = {
        "settings": {key: value for key, value in vars(args).items() if key not in ("arm", "arm_output", "forwarded")},
        "machine": machine() | {"load_average_1min_before_after": load},
        "matmul_peak_flops": max(peaks),
        "matmul_peak_flops_before_after": peaks,
        "flop_formula": FORMULA,
        "flop_terms": runs["hf-trainer"]["terms"],
        "same_examples": len({a["real_tokens"] for a in arms.values()}) == 1,
        "noisy": any(abs(ratio - 1) > 0.1 for ratio in wall_vs_median),
        "arms": arms,
        "targets": targets(arms),
    }
    print_report(results)
    write_json_atomic(RESULTS, results)
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
