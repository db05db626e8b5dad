"""Adapters that let external evaluators run reasoning-lab's data, prompts and scoring: `inspect_task.py`, an
inspect-ai task (inspect-ai is an optional extra) scoring exactly as `cli.py test` does.

Layer 4, the entry points: may import every layer below (core, tasks, models, evaluation, datamodules,
lightning_modules, callbacks); never cli.py or commands/. Nothing below imports them.
"""
