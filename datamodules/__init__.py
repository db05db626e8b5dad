"""Tasks, prompts, answer scoring, batching and the LightningDataModule."""
