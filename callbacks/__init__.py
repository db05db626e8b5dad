"""Callbacks own the side effects of a run: exports, run summaries, dumps."""
