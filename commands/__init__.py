"""The companion commands of cli.py (`python cli.py COMMAND`, listed in `cli.COMMANDS`): one module each, whose
function's signature and docstring are the command's arguments and `--help`; and the CLI of Lightning's
subcommands (`lightning_cli.py`, with LightningCLI's private steps behind `cli_internals.py`).

Layer 4, the entry points: may import every layer below (core, tasks, models, evaluation, datamodules,
lightning_modules, callbacks); never cli.py (it imports them) or integrations/. Nothing below imports them.
"""
