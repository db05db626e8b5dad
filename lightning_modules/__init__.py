"""Model loading, generation and the LightningModules (fine-tuning, and the methods built on it)."""
