"""Every setting of the two settings objects as one row: the modifier's field name, its type,
default and one-line help, taken from where they are declared.

:class:`~armor_modifier.core.SolverSettings` (help in :data:`~armor_modifier.core.FIELD_HELP`) and
:class:`~armor_modifier.core.reconstruct.ReconstructionSettings` (help in each field's metadata;
modifier names from :data:`~armor_modifier.core.reconstruct.RECONSTRUCTION_FIELDS`) are the only
places a knob is declared; ``ARMORModifier``'s fields, the ``armor prune`` options and the table
in ``docs/settings.md`` are all built from :func:`setting_rows`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from .reconstruct import RECONSTRUCTION_FIELDS, ReconstructionSettings
from .settings import FIELD_HELP, SolverSettings

__all__ = ["SettingRow", "setting_rows", "settings_table"]


@dataclass(frozen=True)
class SettingRow:
    """One setting.

    :param name: the ``ARMORModifier`` field (and, dashed, the ``armor prune`` option).
    :param kind: its type (``bool``, ``int``, ``float``, a ``Literal``, or one of them ``| None``).
    :param default: its default.
    :param help: what it does, one line.
    :param group: ``"solver"`` or ``"reconstruction"``.
    """

    name: str
    kind: Any
    default: Any
    help: str
    group: str

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values of a ``Literal`` type (``None`` dropped), else ``None``."""
        for part in (self.kind, *typing.get_args(self.kind)):
            if typing.get_origin(part) is Literal:
                return typing.get_args(part)
        return None

    @property
    def scalar(self) -> type:
        """The plain type behind ``kind`` (``int`` for ``int | None``)."""
        parts = [p for p in typing.get_args(self.kind) if p is not type(None)] or [self.kind]
        return parts[0] if isinstance(parts[0], type) else str


def setting_rows() -> list[SettingRow]:
    """Every solver setting, then every decoder-layer setting, in declaration order."""
    rows = []
    solver_types = typing.get_type_hints(SolverSettings)
    for f in dataclasses.fields(SolverSettings):
        rows.append(SettingRow(f.name, solver_types[f.name], f.default, FIELD_HELP[f.name],
                               "solver"))  # fmt: skip
    layer_types = typing.get_type_hints(ReconstructionSettings)
    by_name = {f.name: f for f in dataclasses.fields(ReconstructionSettings)}
    for option, name in RECONSTRUCTION_FIELDS.items():
        f = by_name[name]
        rows.append(SettingRow(option, layer_types[name], f.default, f.metadata["help"],
                               "reconstruction"))  # fmt: skip
    return rows


def _type_name(kind: Any) -> str:
    text = str(kind).replace("typing.", "")
    return text.removeprefix("<class '").removesuffix("'>").replace("|", "\\|")


def settings_table() -> str:
    """Markdown: one row per setting (field, type, default, what it does)."""
    lines = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for row in setting_rows():
        kind, default = _type_name(row.kind), repr(row.default)
        lines.append(f"| `{row.name}` | {kind} | `{default}` | {row.help.replace('|', '/')} |")
    return "\n".join(lines)
