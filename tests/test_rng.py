"""The RNG states a checkpoint keeps (`core/rng.py`): restoring them replays the same draws."""

from __future__ import annotations

import torch

from core.rng import restore_rng_states, rng_states


def test_restored_states_replay_the_same_draws():
    torch.manual_seed(3)
    states = rng_states()
    assert set(states) == ({"torch", "cuda"} if torch.cuda.is_available() else {"torch"})
    first = torch.rand(5)
    torch.rand(7)  # the run goes on
    restore_rng_states(states)
    assert torch.equal(torch.rand(5), first)


def test_the_states_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    torch.save({"rng_states": rng_states()}, tmp_path / "a.ckpt")
    expected = torch.rand(4)
    torch.manual_seed(99)
    restore_rng_states(torch.load(tmp_path / "a.ckpt", weights_only=True)["rng_states"])
    assert torch.equal(torch.rand(4), expected)


def test_absent_states_leave_the_rng_as_it_is():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    restore_rng_states({})  # a checkpoint saved before the states were kept
    if not torch.cuda.is_available():
        restore_rng_states({"cuda": [torch.zeros(16, dtype=torch.uint8)]})  # saved on a CUDA machine
    assert torch.equal(torch.rand(3), expected)
