"""Registers ``optimum-cli armor`` (armor-modifier's command line) with optimum-cli.

optimum-cli imports every module of the PEP 420 namespace ``optimum.commands.register`` (so no
``__init__.py`` anywhere under ``src/optimum``) and registers its ``REGISTER_COMMANDS``. Kept tiny:
the command imports armor-modifier only when optimum-cli builds its parser.
"""

from armor_modifier.integrations.optimum_commands import ArmorCommand

REGISTER_COMMANDS = [ArmorCommand]
