"""Lightning's private Trainer attributes behind callbacks/lightning_internals.py, checked on a real Trainer: a
Lightning upgrade that moves them fails here, not in a SLURM job at its time limit."""

from __future__ import annotations

import os

import lightning as L
import pytest
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from callbacks.lightning_internals import cluster_environment
from callbacks.slurm import SlurmRequeue

SLURM_TASK = {  # what srun gives the one task of a one-node, one-task job
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "finetune", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
}  # fmt: skip


@pytest.fixture
def no_cluster(monkeypatch):
    """An environment without any scheduler's variables."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, **kwargs)


def test_a_plain_machine_is_lightnings_own_environment(no_cluster):
    assert type(cluster_environment(trainer())) is LightningEnvironment
    assert SlurmRequeue.environment(trainer()) is None


def test_a_slurm_task_is_detected_with_requeue_on(no_cluster, monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    environment = cluster_environment(trainer())
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert SlurmRequeue.environment(trainer()) is not None


def test_the_environment_given_as_a_plugin_is_the_one_returned(no_cluster, monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    given = SLURMEnvironment(auto_requeue=False)
    run = trainer(plugins=[given])
    assert cluster_environment(run) is given
    assert SlurmRequeue.environment(run) is None  # requeue off: SIGTERM handling of a plain machine
