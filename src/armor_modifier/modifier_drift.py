"""Dense-model inputs beside the pruned ones in llm-compressor's sequential pipeline.

For :class:`~armor_modifier.modifier.ARMORModifier` with ``correct_drift=True``: the statistic
``C = X_p^T X_d / N`` pairs, token by token, each target Linear's input in the partly pruned model
(``X_p``, what the pipeline feeds it) with its input in the dense model (``X_d``); the solver then
fits the dense model's output (:mod:`armor_modifier.core.drift`).

How the dense inputs are obtained without a second model: a decoder layer (a child of the
model's ``nn.ModuleList`` holding the targets) is still dense when its subgraph's calibration
pass runs, so a forward pre-hook records each batch's call ``(args, kwargs)`` there. At the end
of the subgraph, before ARMOR compresses it, each recorded call is replayed twice with only this
module's capture hooks enabled: once as recorded (``X_p`` for every target inside) and once with
the dense hidden states in place of the first argument (``X_d``, and the dense hidden states for
the next layer). The first layer's dense input is its recorded input (nothing before it is
pruned). Batches are matched by llm-compressor's ``state.current_batch_idx``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from llmcompressor.core import active_session
from llmcompressor.modifiers.utils.hooks import HooksMixin
from torch import nn

__all__ = ["DriftTracker", "decoder_layers_of"]


def decoder_layers_of(model: nn.Module, targets: Iterable[nn.Module]) -> list[nn.Module]:
    """Children of the ``nn.ModuleList``\\ s that contain a target, in model order.

    :raises ValueError: if a target sits in no ``nn.ModuleList`` child (no layer to replay)
    """
    targets = set(targets)
    layers: list[nn.Module] = []
    covered: set[nn.Module] = set()
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        children = list(module)
        inside = [set(child.modules()) & targets for child in children]
        if any(inside):
            layers.extend(children)
            for found in inside:
                covered |= found
    missing = targets - covered
    if missing:
        raise ValueError(
            f"correct_drift=True needs every target inside a decoder layer of an nn.ModuleList; "
            f"{len(missing)} are not (e.g. {type(next(iter(missing))).__name__}). Use "
            "correct_drift=False or ignore those modules"
        )
    return layers


class DriftTracker:
    """Records decoder-layer calls and accumulates ``X_p^T X_d`` for the targets inside them.

    :param owner: the modifier that owns the hooks (removed with its other hooks)
    :param layers: decoder layers in execution order (:func:`decoder_layers_of`)
    :param cross_sum: target Linear -> its ``[n, n]`` float32 running ``sum_t x_p x_d^T`` (added
        to in place; divide by the token count to get ``C``)
    :param targets: the target Linears
    """

    def __init__(
        self,
        owner: HooksMixin,
        layers: list[nn.Module],
        cross_sum: Callable[[nn.Module], torch.Tensor],
        targets: Iterable[nn.Module],
    ) -> None:
        self._owner = owner
        self._layers = layers
        self._cross_sum = cross_sum
        self._targets = set(targets)
        self._calls: dict[nn.Module, dict[int, tuple[tuple, dict]]] = {}
        self._dense_hidden: dict[int, torch.Tensor] = {}
        for layer in layers:
            owner.register_hook(layer, self._record_call, "forward_pre", with_kwargs=True)

    def _record_call(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        batch = int(getattr(active_session().state, "current_batch_idx", 0) or 0)
        self._calls.setdefault(layer, {})[batch] = (args, dict(kwargs))

    def finish(self, modules: Iterable[nn.Module]) -> None:
        """Replay the recorded calls of the decoder layers among ``modules`` (in model order).

        Call before those layers are compressed; it adds to the cross-sums of their targets and
        advances the dense hidden states past them.
        """
        present = {id(m) for m in modules}
        for layer in self._layers:
            if id(layer) in present and layer in self._calls:
                self._replay(layer, self._calls.pop(layer))

    def _replay(self, layer: nn.Module, calls: dict[int, tuple[tuple, dict]]) -> None:
        inside = [m for m in layer.modules() if m in self._targets]
        seen: dict[nn.Module, torch.Tensor] = {}

        def capture(module: nn.Module, args: tuple, _output: Any) -> None:
            seen[module] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)

        handles = {self._owner.register_hook(m, capture, "forward") for m in inside}
        try:
            with torch.no_grad(), HooksMixin.disable_hooks(keep=handles):
                for batch, (args, kwargs) in sorted(calls.items()):
                    hidden, key = _hidden_of(args, kwargs)
                    dense = self._dense_hidden.get(batch, hidden)
                    layer(*args, **kwargs)
                    pruned_inputs = dict(seen)
                    seen.clear()
                    dense_args, dense_kwargs = _with_hidden(args, kwargs, dense, key)
                    out = layer(*dense_args, **dense_kwargs)
                    for module in inside:
                        xp, xd = pruned_inputs.get(module), seen.get(module)
                        if xp is None or xd is None or xp.shape != xd.shape:
                            raise ValueError(
                                "correct_drift=True needs every target to see the same tokens "
                                "in the dense and the pruned pass (token routing, as in "
                                "mixture-of-experts layers, is not supported); use "
                                "correct_drift=False"
                            )
                        self._cross_sum(module).addmm_(xp.T.to(xd.device), xd)
                    seen.clear()
                    hidden_out = out[0] if isinstance(out, tuple) else out
                    self._dense_hidden[batch] = hidden_out.detach()
        finally:
            self._owner.remove_hooks(handles)


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    """The hidden-states tensor of a decoder-layer call (first positional or ``hidden_states``)
    and its keyword (``None`` if positional)."""
    if args:
        return args[0], None
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"], "hidden_states"
    raise ValueError(
        "correct_drift=True: a decoder layer was called without hidden states as its first "
        "argument or `hidden_states=`; this architecture is not supported"
    )


def _with_hidden(
    args: tuple, kwargs: dict, hidden: torch.Tensor, key: str | None
) -> tuple[tuple, dict]:
    if key is None:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, key: hidden}
