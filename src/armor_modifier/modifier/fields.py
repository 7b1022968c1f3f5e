"""``ARMORModifier``'s settings fields as pydantic fields, built from
:func:`armor_modifier.core.options.setting_rows` (type, default, description), so a knob is
declared once, in its settings object; and what a run records of them (the armor-ct recipe, the
progress folder's ``run.json``)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import Field

from armor_modifier.core.options import setting_rows

__all__ = ["PROGRESS_HELP", "recorded_settings", "run_info", "settings_fields"]

PROGRESS_HELP = (
    "folder for progress that outlives the process: each finished decoder layer's factors are "
    "written there, and a later run with the same folder, model, recipe and calibration data "
    "loads them instead of solving again (None: off; docs/usage.md, 'Resume')"
)


def settings_fields() -> dict[str, Any]:
    """``{name: (type, pydantic Field)}`` for ``pydantic.create_model``."""
    return {
        row.name: (row.kind, Field(default=row.default, description=row.help))
        for row in setting_rows()
    }


def recorded_settings(modifier: Any) -> dict[str, Any]:
    """What an armor-ct checkpoint records in ``armor.recipe`` for ``modifier`` (JSON-able)."""
    return {
        "modifier": type(modifier).__name__,
        "targets": modifier.targets,
        "ignore": list(modifier.ignore),
        "mask_structure": modifier.mask_structure,
        "calibration": modifier.effective_calibration,
        **modifier.solver_settings.to_dict(),
        "wrapper_block_size": modifier.wrapper_block_size,
        "budget_block_size": modifier.budget_block_size,
        **modifier.reconstruction_settings.to_fields(),
    }


def run_info(modifier: Any, targets: Iterable[str]) -> dict[str, Any]:
    """What a progress folder's results depend on besides each layer's weights and statistics:
    the package version, the recorded recipe and the targets."""
    try:
        package = version("armor-modifier")
    except PackageNotFoundError:  # a source tree on sys.path without installed metadata
        package = "unknown"
    return {
        "armor_modifier": package,
        "recipe": recorded_settings(modifier),
        "targets": list(targets),
    }
