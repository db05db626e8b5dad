"""Layer 3, the LightningModules (fine-tuning; SLOT's evaluation arms), their LR schedule and the FSDP2
strategy. Imports `core`, `tasks`, `models` and `evaluation`; never `datamodules` or `callbacks`."""
