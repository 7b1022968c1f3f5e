"""An unset ``reconstruction_steps``: decoder-layer reconstruction where the run allows it.

Left unset (``None``), ``reconstruction_steps`` becomes
:data:`~armor_modifier.core.reconstruct.DEFAULT_STEPS` when the run can replay decoder layers, and
0, with one warning saying why and what to change, when it cannot: statistics from the dense
model (``calibration="dense"``, the default of ``objective="proxy"``), too few calibration windows
to hold one out, or a target outside every decoder layer. A decoder layer whose replay does not
reproduce its output is found later, during the first calibration batch (:mod:`.capture`), and
turns it off the same way. A number given stays an error in each case
(:func:`.checks.check_guard_windows`, :func:`.capture.decoder_layers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from loguru import logger
from torch import nn

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.reconstruct import DEFAULT_STEPS, ReconstructionSettings

from .capture import UNSET_STEPS_OFF, outside_decoder_layers
from .checks import calibration_batches

__all__ = ["check_layer_calibration", "resolve_unset_steps"]


def check_layer_calibration(settings: ReconstructionSettings, calibration: str) -> None:
    """Refuse decoder-layer work given (propagation, a number of reconstruction steps) on
    statistics from the dense model: it replays layers on the sequential pipeline's inputs.

    :raises ARMORValueError: naming both settings and the fix
    """
    if settings.asks_for_layer_work and calibration != "sequential":
        raise ARMORValueError(
            f"propagate_within_layer={settings.propagate_within_layer} / reconstruction_steps="
            f"{settings.steps} replay decoder layers on the sequential pipeline's inputs, but "
            f"calibration is {calibration!r}; set calibration='sequential' (objective='output' "
            "defaults to it)"
        )


def resolve_unset_steps(
    settings: ReconstructionSettings,
    calibration: str,
    model: nn.Module,
    targets: dict[str, nn.Linear],
    calib: Any,
) -> ReconstructionSettings:
    """``settings`` with an unset ``steps`` replaced: :data:`DEFAULT_STEPS` where the run allows
    reconstruction, else 0 (with a warning naming the reason). A ``steps`` given is kept.

    :param settings: the modifier's decoder-layer settings.
    :param calibration: the effective calibration, ``"sequential"`` or ``"dense"``.
    :param model: the model being compressed.
    :param targets: ``{name: Linear}`` of every target.
    :param calib: llm-compressor's calibration dataloader (its length counts this rank's batches).
    """
    if settings.steps is not None:
        return settings
    why = _why_not(settings, calibration, model, targets, calib)
    if why is not None:
        logger.warning(f"ARMOR: {why}; {UNSET_STEPS_OFF}")
        return dataclasses.replace(settings, steps=0)
    return dataclasses.replace(settings, steps=DEFAULT_STEPS)


def _why_not(
    settings: ReconstructionSettings,
    calibration: str,
    model: nn.Module,
    targets: dict[str, nn.Linear],
    calib: Any,
) -> str | None:
    if calibration != "sequential":
        return (
            f"calibration={calibration!r} collects statistics from the dense model, and "
            "reconstruction replays decoder layers on the sequential pipeline's inputs"
        )
    batches = calibration_batches(calib)  # None: as with a number given, the run finds out
    need = settings.min_windows()
    if batches is not None and batches < need:
        return (
            f"{batches} calibration batches leave no guard window to hold out "
            f"(reconstruction_guard_fraction={settings.guard_fraction:g} needs {need})"
        )
    outside = outside_decoder_layers(model, targets)
    if outside:
        return (
            f"targets {outside} lie in no decoder layer (add them to `ignore` to reconstruct "
            "the others)"
        )
    return None
