"""Decoder-layer capture: each layer's calibration inputs and dense outputs, and their replay.

During the calibration pass two hooks on each decoder layer (an element of an ``nn.ModuleList``
that contains targets) capture its inputs ``X_i`` (positional and keyword arguments: rotary
embeddings, attention mask) and its dense output ``f(X_i)``, one entry per calibration batch, and
a pre-hook on each target records the order in which the forward calls them (with the input
tensor, to find the Linears that share one). The first window of each layer class is replayed at
once and must give the captured output, so an architecture the replay cannot reproduce stops
before any compression. Captures are freed per layer by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from torch import nn

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.reconstruct import DEFAULT_STEPS

__all__ = [
    "Capture",
    "LayerCapture",
    "decoder_layers",
    "first_tensor",
    "hidden_of",
    "outside_decoder_layers",
    "UNSET_STEPS_OFF",
]

#: the end of the warning when an unset ``reconstruction_steps`` turns reconstruction off
UNSET_STEPS_OFF = (
    f"decoder-layer reconstruction (on by default, {DEFAULT_STEPS} steps per layer) is off for "
    "this run; set reconstruction_steps=0 to turn it off without this warning"
)


def decoder_layers(
    model: nn.Module, targets: dict[str, nn.Linear]
) -> tuple[dict[str, nn.Module], dict[nn.Linear, str]]:
    """``{name: layer}`` of the ``nn.ModuleList`` elements that contain targets (model order),
    and each target's innermost such layer, ``{target: layer name}``.

    :raises ARMORValueError: naming a target that lies in no such layer
    """
    layers = _list_elements(model)
    owner_of: dict[nn.Linear, str] = {}
    for target, module in targets.items():
        owner = max((n for n in layers if target.startswith(n + ".")), key=len, default=None)
        if owner is None:
            raise ARMORValueError(
                f"{target} is in no decoder layer (an element of an nn.ModuleList), so "
                "propagate_within_layer / reconstruction_steps cannot replay it; add it to "
                "`ignore` or leave both off"
            )
        owner_of[module] = owner
    owned = set(owner_of.values())
    return {name: layer for name, layer in layers.items() if name in owned}, owner_of


def outside_decoder_layers(model: nn.Module, targets: dict[str, nn.Linear]) -> list[str]:
    """The names of the targets that lie in no element of an ``nn.ModuleList``."""
    layers = _list_elements(model)
    return [t for t in targets if not any(t.startswith(name + ".") for name in layers)]


def _list_elements(model: nn.Module) -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, child in enumerate(module):
                layers[f"{name}.{index}" if name else str(index)] = child
    return layers


@dataclass
class Capture:
    """One layer's calibration windows: inputs, keyword arguments, dense outputs, call order."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    call_order: list[tuple[nn.Linear, torch.Tensor]] = field(default_factory=list)

    def inputs(self) -> list[torch.Tensor]:
        """``X_i``: the hidden-state input of every window."""
        return [hidden_of(a, k) for a, k in zip(self.args, self.kwargs, strict=True)]


def hidden_of(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """A decoder layer's hidden-state input from its call arguments."""
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def first_tensor(output: Any) -> torch.Tensor:
    """A module's output tensor: the output itself, or the first element of a tuple / list."""
    return output[0] if isinstance(output, tuple | list) else output


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


class LayerCapture:
    """Hooks that capture every decoder layer's windows, and the replay of a captured window.

    :param layers: ``{name: decoder layer}`` to capture.
    :param targets: the target Linears inside them (their call order is recorded).
    :param register_hook: the hook owner's ``register_hook(module, fn, kind, **kwargs)``
        (llm-compressor's ``HooksMixin``, so ``disable_hooks`` silences them during replays).
    :param optional: a layer that cannot be replayed stops the capture (``unsupported`` says
        why, logged as a warning; every later ``pop`` is empty) instead of raising.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        targets: list[nn.Linear],
        register_hook: Callable[..., Any],
        optional: bool = False,
    ) -> None:
        self.layers = layers
        self._targets = targets
        self._register_hook = register_hook
        self._captures: dict[nn.Module, Capture] = {}
        self._checked: set[type] = set()
        self._recording: Capture | None = None
        self._quiet = False
        self._optional = optional
        self.unsupported: str | None = None

    def register_hooks(self) -> None:
        """Hook every decoder layer (inputs and outputs) and every target (call order)."""
        pre: Callable[..., None] = self._pre_hook
        post: Callable[..., None] = self._post_hook
        order: Callable[..., None] = self._linear_hook
        for layer in self.layers.values():
            self._register_hook(layer, pre, "forward_pre", with_kwargs=True)
            self._register_hook(layer, post, "forward", with_kwargs=True)
        for module in self._targets:
            self._register_hook(module, order, "forward_pre")

    def pop(self, layer: nn.Module) -> Capture:
        """The layer's capture, handed over (the caller frees it when the layer is done)."""
        return self._captures.pop(layer, Capture())

    def release(self) -> None:
        """Drop every captured activation."""
        self._captures = {}
        self._recording = None

    def _pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._quiet or self.unsupported:
            return
        capture = self._captures.setdefault(layer, Capture())
        capture.args.append(tuple(_detach(a) for a in args))
        capture.kwargs.append({k: _detach(v) for k, v in kwargs.items()})
        self._recording = capture if not capture.outputs else None

    def _linear_hook(self, module: nn.Linear, args: tuple) -> None:
        if self._recording is not None and not (self._quiet or self.unsupported):
            # the tensor itself, not its id: a freed input's id can be reused by the next one
            self._recording.call_order.append((module, args[0]))

    def _post_hook(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        if self._quiet or self.unsupported:
            return
        self._recording = None
        capture = self._captures[layer]
        hidden = first_tensor(output)
        if not isinstance(hidden, torch.Tensor) or hidden.shape != hidden_of(args, kwargs).shape:
            self._refuse(
                f"{type(layer).__name__} returns {type(output).__name__}, not its hidden states "
                "(a tensor shaped like its input, or a tuple starting with one), so ARMOR cannot "
                "replay it for propagate_within_layer / reconstruction_steps; leave both off"
            )
            return
        capture.outputs.append(hidden.detach())
        if type(layer) not in self._checked:
            self._check_replay(layer, capture)

    def _check_replay(self, layer: nn.Module, capture: Capture) -> None:
        """Replay the first window and demand the captured output (before any compression)."""
        name = type(layer).__name__
        try:
            replayed = self.forward(layer, 0, capture)
        except Exception as err:  # noqa: BLE001  (any failure means: cannot replay)
            self._refuse(
                f"{name} cannot be replayed from the inputs its hooks captured ({err!r}); "
                "propagate_within_layer / reconstruction_steps do not support this architecture",
                err,
            )
            return
        if not torch.allclose(replayed, capture.outputs[0], rtol=1e-4, atol=1e-5):
            self._refuse(
                f"{name} gives a different output when replayed from its captured inputs (max "
                f"difference {float((replayed - capture.outputs[0]).abs().max()):.3g}); its "
                "forward depends on state the hooks do not see, so propagate_within_layer / "
                "reconstruction_steps do not support it"
            )
            return
        self._checked.add(type(layer))

    def _refuse(self, message: str, cause: Exception | None = None) -> None:
        """Raise ``message``; with ``optional``, log it and stop capturing instead."""
        if not self._optional:
            raise ARMORValueError(message) from cause
        logger.warning(f"ARMOR: {message}; {UNSET_STEPS_OFF}")
        self.unsupported = message
        self.release()

    @contextmanager
    def replaying(self, keep_hooks: bool = False) -> Iterator[None]:
        """Run layers without capturing (and, unless ``keep_hooks``, without any modifier hook,
        so no statistics are added)."""
        self._quiet = True
        try:
            if keep_hooks:
                yield
            else:
                with HooksMixin.disable_hooks():
                    yield
        finally:
            self._quiet = False

    def forward(
        self, layer: nn.Module, i: int, capture: Capture, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's hidden-state output for window ``i`` (``hidden`` replaces its input)."""
        args, kwargs = capture.args[i], capture.kwargs[i]
        if hidden is not None:
            args, kwargs = _with_hidden(args, kwargs, hidden)
        with self.replaying():
            return first_tensor(layer(*args, **kwargs))
