"""``ARMORModifier``'s settings fields as pydantic fields, built from
:func:`armor_modifier.core.options.setting_rows` (type, default, description), so a knob is
declared once, in its settings object."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from armor_modifier.core.options import setting_rows

__all__ = ["settings_fields"]


def settings_fields() -> dict[str, Any]:
    """``{name: (type, pydantic Field)}`` for ``pydantic.create_model``."""
    return {
        row.name: (row.kind, Field(default=row.default, description=row.help))
        for row in setting_rows()
    }
