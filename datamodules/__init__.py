"""Layer 3, Lightning data wiring: the LightningDataModule (task -> prompt -> ids -> batches) and packing.
Imports `core`, `tasks`, `models` and `evaluation`; never `lightning_modules` or `callbacks`."""
