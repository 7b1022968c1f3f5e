"""``optimum-cli armor ...``: the ``armor`` command line as an optimum-cli sub-command.

One implementation, two entry points: the sub-commands and options come from
:func:`armor_modifier.cli.add_commands`, the run from :func:`armor_modifier.cli.run_command`, so
``optimum-cli armor prune ...`` and ``armor prune ...`` are the same program (bad input: one
``armor: error: ...`` line, exit code 2).
"""

from __future__ import annotations

import argparse
import sys

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

__all__ = ["ArmorCommand"]


class ArmorCommand(BaseOptimumCLICommand):
    """The ``armor`` sub-command of ``optimum-cli`` (prune, eval, export-dense, export-onnx)."""

    COMMAND = CommandInfo(
        name="armor",
        help="ARMOR 2:4 pruning (armor-modifier): prune, eval, export-dense, export-onnx",
    )

    @staticmethod
    def parse_args(parser: argparse.ArgumentParser) -> None:
        from armor_modifier.cli import add_commands

        add_commands(parser)

    def run(self) -> None:
        from armor_modifier.cli import run_command

        code = run_command(self.args, self.parser)
        if code:
            sys.exit(code)
