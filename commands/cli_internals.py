"""The private parts of LightningCLI and jsonargparse that the CLI relies on, each behind a public name here.

LightningCLI's constructor runs `parse_arguments`, `_parse_ckpt_path`, `_set_seed`, `before_instantiate_classes`,
`instantiate_classes`, `after_instantiate_classes` and `_run_subcommand`, in that order. Three of those steps
are private; `HookedLightningCLI` forwards them to hooks a subclass overrides: `apply_checkpoint_settings`,
`seed` and `run_subcommand` (each runs Lightning's own step unless overridden). `option_names` reads a parser's
options from argparse's `_actions`. tests/test_cli_internals.py checks them against the installed Lightning and
jsonargparse: an upgrade that renames or stops calling one fails there.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


class HookedLightningCLI(LightningCLI):
    """LightningCLI whose private steps are the public hooks below."""

    def apply_checkpoint_settings(self) -> None:
        """After parsing: re-apply the hyper-parameters of the `--ckpt_path` checkpoint over the config."""
        super()._parse_ckpt_path()

    def seed(self) -> None:
        """After the checkpoint's settings: seed every generator from `seed_everything`."""
        super()._set_seed()

    def run_subcommand(self, subcommand: str) -> None:
        """After instantiating the classes: run `subcommand` (`trainer.fit(model, datamodule)`...)."""
        super()._run_subcommand(subcommand)

    def _parse_ckpt_path(self) -> None:
        self.apply_checkpoint_settings()

    def _set_seed(self) -> None:
        self.seed()

    def _run_subcommand(self, subcommand: str) -> None:
        self.run_subcommand(subcommand)


def option_names(parser, argv: list[str]) -> list[str]:
    """The dotted option names of the subcommand in `argv` (or of `parser` itself): did-you-mean candidates."""
    actions = parser._actions
    for action in actions:
        choices = action.choices if isinstance(getattr(action, "choices", None), dict) else {}
        name = next((arg for arg in argv if arg in choices), None)
        if name is not None:
            actions = choices[name]._actions
            break
    return [action.dest for action in actions if action.dest not in ("help", "==SUPPRESS==")]
