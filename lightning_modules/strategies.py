"""Training strategies usable as `trainer.strategy` in a config."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 (torch's `fully_shard`) over every process: data-parallel size = world size, no tensor parallelism.

    The LightningModule shards itself in `configure_model` over `device_mesh["data_parallel"]`
    (models/sharding.py). Unlike Lightning's FSDPStrategy (FSDP1), it also runs on CPU processes (gloo).

    Args:
        save_distributed_checkpoint: one checkpoint file per rank instead of one gathered on rank 0.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, **kwargs) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()
