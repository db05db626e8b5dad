"""FSDP2 on CPU processes (gloo): only rank 0 reads the backbone, each rank holds half, and the fit runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import REPO, run_dir, tiny_args
from safetensors.torch import load_file

from models.adapters import LoraSpec, build_trainable_model
from models.fingerprint import fingerprint
from models.loader import load_trained
from models.loading import ModelSpec, load_model, load_tokenizer
from models.training_info import read_training_info
from models.vocabulary import add_tokens
from tasks.planning import PlanningSpec

PLANNING = PlanningSpec(method="arithmetic", n_prefix=3, n_special=2)


def shard_on_rank(rank: int, folder: str, port: int, out: str) -> None:
    """One of two gloo processes: shard the LoRA + planning-token model and record what this rank held."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from models.sharding import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    spec, built = ModelSpec(name=folder), {}
    tokenizer = load_tokenizer(spec)
    new_tokens = set(add_tokens(tokenizer, PLANNING.tokens()))

    def build(empty: bool):
        model = build_trainable_model(load_model(spec, empty=empty), tokenizer, "lora+prompt-tuning",
                                      LoraSpec(), PLANNING, new_tokens)  # fmt: skip
        built["meta"] = sum(p.numel() for p in model.parameters() if p.is_meta)
        built["real_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        return model

    model = shard_model(build, init_device_mesh("cpu", (2,)), torch.device("cpu"))
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(full, f"{out}/gathered.pt")
    record = {"held_bytes": held, **built}
    with open(f"{out}/rank{rank}.json", "w") as file:
        json.dump(record, file)
    dist.destroy_process_group()


@pytest.mark.slow
def test_only_rank_0_reads_the_weights_and_each_rank_holds_half(tiny_llama, tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(shard_on_rank, args=(str(tiny_llama), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["meta"] == 0 and ranks[1]["real_bytes"] == 0  # rank 1 never held a weight before sharding
    total = ranks[0]["real_bytes"]
    assert all(abs(r["held_bytes"] - total / 2) <= 0.02 * total for r in ranks)  # each holds its half
    # the shards hold rank 0's model: the reference built in this process the same way (seeded LoRA init)
    tokenizer = load_tokenizer(ModelSpec(name=str(tiny_llama)))
    new_tokens = set(add_tokens(tokenizer, PLANNING.tokens()))
    torch.manual_seed(0)
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)
    expected = build_trainable_model(load_model(ModelSpec(name=str(tiny_llama))), tokenizer, "lora+prompt-tuning",
                                     LoraSpec(), PLANNING, new_tokens).state_dict()  # fmt: skip
    frozen = [key for key in expected if "lora_" not in key]  # LoRA A is random: rank 0's draw, not ours
    assert frozen and all(torch.equal(gathered[key], expected[key]) for key in frozen)


@pytest.mark.slow
def test_fsdp_preset_fits_on_two_cpu_processes(tiny_llama, tmp_path):
    args = tiny_args(tiny_llama, tmp_path, "--config", str(REPO / "configs/presets/gpu_fsdp.yaml"),
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.train_limit", "8",
                     "--data.val_size", "2", "--model.init_args.generation.max_new_tokens", "4")  # fmt: skip
    result = subprocess.run([sys.executable, str(REPO / "cli.py"), "fit", *args], capture_output=True, text=True,
                            cwd=REPO, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = run_dir(tmp_path)
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    assert checkpoint["global_step"] == 1 and state and all("lora_" in k or "trainable_tokens" in k for k in state)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}  # the preset trains in bf16-true
    # the gathered export and the gathered checkpoint are the same model: every weight, bit for bit (the export
    # is the merge saved in the run's bf16)
    exported = load_file(run / "epoch_0/model.safetensors")
    merged = load_trained(ModelSpec(name=str(tiny_llama)), str(run / "checkpoints/last.ckpt")).model
    expected = {name: parameter.detach().to(torch.bfloat16) for name, parameter in merged.named_parameters()}
    assert set(exported) == set(expected)
    assert [key for key in expected if not torch.equal(exported[key], expected[key])] == []
    # rank 0 recorded the base weights' fingerprint (loaded in bf16, before sharding): the plain float32 load's
    recorded = read_training_info(run / "epoch_0").base_fingerprint
    assert recorded == checkpoint["base_fingerprint"] == fingerprint(load_model(ModelSpec(name=str(tiny_llama))))
