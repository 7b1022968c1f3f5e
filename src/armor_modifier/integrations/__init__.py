"""Front-ends for other tool chains, at the level of the CLI (they may run llm-compressor).

- :mod:`.optimum_quantizer` :class:`ARMORQuantizer`, an ``optimum`` ``OptimumQuantizer``
- :mod:`.optimum_commands` the ``optimum-cli armor`` command (registered through
  ``src/optimum/commands/register/armor_modifier_commands.py``)

Both need the ``[optimum]`` extra; without it ``ARMORQuantizer`` raises an ``ImportError`` naming
the extra, and the ``armor`` command line is unaffected.
"""
