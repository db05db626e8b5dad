"""The private parts of Lightning's Trainer that the callbacks read, each behind a public name here.

tests/test_lightning_internals.py checks them on a real Trainer: a Lightning upgrade that moves one fails there.
"""

from __future__ import annotations

import lightning as L
from lightning.fabric.plugins.environments import ClusterEnvironment


def cluster_environment(trainer: L.Trainer) -> ClusterEnvironment:
    """The cluster environment the trainer runs in (SLURM, torchelastic, a plain machine...): the plugin given
    in `trainer.plugins` or the one Lightning detected. Lightning has no public accessor for it (a single-device
    strategy does not hold one)."""
    return trainer._accelerator_connector.cluster_environment
