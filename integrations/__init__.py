"""Adapters that let external evaluators (inspect-ai) run reasoning-lab's data, prompts and scoring."""
