"""What each rank holds while the FSDP preset loads a backbone, on 2 CPU processes (gloo):

- sharded (models/sharding.py, what `configure_model` does): rank 0 reads the weights, rank 1 builds on the meta
  device and receives its shard;
- every rank reads (the obvious way): each rank loads the full model, then shards it.

Per rank: the memory the load added (peak RSS during it, sampled every 2 ms, minus RSS before) and the parameter
bytes held after sharding, for a random-weight Llama (default ~25M parameters; the results file: hidden 1024,
8 layers, ~100M) with LoRA + planning tokens, as the main config trains it.

    python benchmarks/fsdp_memory.py [--hidden 512 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import REPO, machine

from core.io import write_json_atomic
from models.adapters import LoraSpec, build_trainable_model
from models.loading import ModelSpec, load_model, load_tokenizer
from models.sharding import shard_model
from models.synthetic import bpe_tokenizer, save_random_model
from models.vocabulary import add_tokens
from tasks.planning import PlanningSpec

PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank: int, folder: str, variant: str, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    spec = ModelSpec(name=folder)
    tokenizer = load_tokenizer(spec)
    new_tokens = set(add_tokens(tokenizer, PLANNING.tokens()))

    def build(empty: bool):
        model = load_model(spec, empty=empty and variant == "sharded")
        return build_trainable_model(model, tokenizer, "lora+prompt-tuning", LoraSpec(), PLANNING, new_tokens)

    mesh = init_device_mesh("cpu", (2,))
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample() -> None:  # the process's peak RSS during the load (ru_maxrss also counts what came before)
        while not done.wait(0.002):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    model = shard_model(build, mesh, torch.device("cpu"))
    done.set()
    sampler.join()
    added = max(peak[0], rss_bytes()) - before
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    Path(out, f"{variant}{rank}.json").write_text(
        json.dumps({"load_added_mib": added / 2**20, "held_mib": held / 2**20, "model_mib": total / 2**20})
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks/results/fsdp_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = save_random_model(Path(work, "model"), "llama", bpe_tokenizer(REPO / "data/gsm8k/train.jsonl"),
                                   hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8)  # fmt: skip
        results = {}
        for index, variant in enumerate(("sharded", "every_rank_reads")):
            mp.spawn(worker, args=(str(folder), variant, 29600 + index + os.getpid() % 500, work), nprocs=2)
            results[variant] = [json.loads(Path(work, f"{variant}{rank}.json").read_text()) for rank in (0, 1)]
    rank1 = results["every_rank_reads"][1]["load_added_mib"] / max(results["sharded"][1]["load_added_mib"], 1e-9)
    report = {"machine": machine(), "shape": {"hidden": args.hidden, "layers": args.layers}, "ranks": results,
              "rank1_load_memory_ratio_every_rank_reads_over_sharded": round(rank1, 2)}  # fmt: skip
    write_json_atomic(args.output, report)
    print(f"{'variant':<18}{'rank':>5}{'load added MiB':>16}{'held MiB':>10}{'model MiB':>11}")
    for variant, ranks in results.items():
        for rank, record in enumerate(ranks):
            print(f"{variant:<18}{rank:>5}{record['load_added_mib']:>16.1f}{record['held_mib']:>10.1f}"
                  f"{record['model_mib']:>11.1f}")  # fmt: skip
    print(f"rank 1 loads {rank1:.1f}x the memory when every rank reads the backbone")


if __name__ == "__main__":
    main()
