"""Layer 3, the side effects of a run: exports, atomic checkpoint saves, sample files and summaries, the planning
report, live dynamics, the run summary and SLURM signals. Imports the layers below and may read what
`lightning_modules` and `datamodules` produce; nothing imports `callbacks` but the entry points."""
