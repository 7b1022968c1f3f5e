"""Decoder-layer reconstruction after GPTQ (docs/algorithm.md, "Reconstruction after GPTQ"):
``ARMORGPTQModifier(reconstruction_steps=N)``.

Once a decoder layer's cores are quantized (mask-keeping GPTQ, then the per-Linear wrapper
refit), its ARMOR Linears' wrappers ``A``, ``B`` and, with ``scales``, a ratio on every
``weight_scale`` (:mod:`.scales`: the core becomes ``levels · (scale ⊙ |r|)``) are fitted
jointly by Adam to the layer's output before quantization, on the windows GPTQ's own
calibration pass captured (the layer's inputs come through the quantized layers below). The
integer codes, the zero points and with them every 2:4 mask never move. The guarantee is
:func:`armor_modifier.core.reconstruct.reconstruct_layer`'s: the kept iterate is the one with the
lowest error on held-out guard windows, and the quantized layer as GPTQ left it wins unless that
error is strictly lower.

The fit runs where llm-compressor's sequential pipeline runs it: inside its calibration, where
quantization is disabled and every quantized weight already holds its grid values; activation
quantization (W8A8) is therefore not part of the fitted forward, as it is not part of the
pipeline's propagation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from armor_modifier.core.reconstruct import ReconstructionSettings

from .capture import outside_decoder_layers
from .reconstruction import (
    Reconstruction,
    factor_parameters,
    trainable_factors,
    write_back_factors,
)
from .scales import trainable_scales, weight_quantized, with_scale_ratios, write_back_scales

__all__ = ["QuantizedReconstruction", "replayable_targets"]


def replayable_targets(model: nn.Module, modules: dict[nn.Module, str]) -> dict[str, nn.Linear]:
    """``{name: Linear}`` of ``modules`` (module -> name, GPTQ's targets) that lie in a decoder
    layer: the ones a layer's replay reaches (a Linear outside, e.g. an unignored head, is
    quantized and not fitted)."""
    linears = {name: m for m, name in modules.items() if isinstance(m, nn.Linear)}
    outside = set(outside_decoder_layers(model, linears))
    return {name: m for name, m in linears.items() if name not in outside}


class QuantizedReconstruction(Reconstruction):
    """The decoder-layer reconstruction of :class:`.reconstruction.Reconstruction` run after a
    layer's cores were quantized: wrappers (and scale ratios) move, codes stay.

    :param model: the model being quantized.
    :param targets: ``{name: Linear}`` GPTQ quantizes inside decoder layers
        (:func:`replayable_targets`).
    :param settings: the fit's settings (``parameters`` is ignored: see ``scales``).
    :param register_hook: the GPTQ modifier's ``register_hook`` (llm-compressor's ``HooksMixin``).
    :param scales: whether each quantized core's scale moves too (else the wrappers alone).
    """

    what = "ARMOR reconstruction after GPTQ"

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        settings: ReconstructionSettings,
        register_hook: Callable[..., Any],
        scales: bool,
    ) -> None:
        super().__init__(model, targets, settings, _quantized_already, _no_statistics,
                         register_hook)  # fmt: skip
        self.scales = scales

    def process_quantized(self, modules: list[nn.Module]) -> None:
        """Fit every decoder layer holding one of ``modules`` (a subgraph's, already quantized);
        free their captures."""
        self.process([m for m in modules if isinstance(m, nn.Linear) and m in self._owner])

    def _fit_parameters(
        self, linears: dict[str, nn.Linear]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[tuple[str, nn.Linear, str]]]:
        """The wrappers of ``linears`` and, with ``scales``, a ratio of ones per quantized core."""
        wrappers = factor_parameters(linears, "wrappers")
        return with_scale_ratios(linears, wrappers) if self.scales else wrappers

    def _trainable(
        self, linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
    ) -> AbstractContextManager[None]:
        return _trainable_quantized(linears, names, params)

    def _write_back(
        self, linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
    ) -> None:
        write_back_factors(linears, names, params)
        write_back_scales(names, params)


@contextmanager
def _trainable_quantized(
    linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
) -> Iterator[None]:
    """The wrappers from ``params`` (:func:`trainable_factors`) around cores computed from their
    codes and moving scales (:func:`trainable_scales`, the quantized ones)."""
    quantized = {key: linears[key] for key in weight_quantized(linears)}
    with trainable_factors(linears, names, params), trainable_scales(quantized, names, params):
        yield


def _quantized_already(_modules: list[nn.Linear]) -> None:
    """GPTQ quantized the subgraph before the fit is called: nothing to compress."""


def _no_statistics(_modules: list[nn.Linear]) -> None:
    """Within-layer propagation is off here: no statistics to restart."""
