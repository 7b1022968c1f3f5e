"""Decoder-layer work for :class:`~armor_modifier.modifier.ARMORModifier` (ARMOR_SPEC.md §12).

Two optional steps run where the sequential pipeline ends a subgraph (``on_sequential_epoch_end``),
before the pipeline propagates the compressed layer's outputs upward:

- **within-layer propagation** (``propagate_within_layer``): the layer's Linears are compressed in
  the order the forward calls them, in groups that share one input (q/k/v, then o, then gate/up,
  then down). Before each later group the layer is replayed on its captured inputs, with the
  earlier groups already compressed, to collect that group's statistics afresh.
- **reconstruction** (``reconstruction_steps > 0``): after the layer is compressed,
  :func:`armor_modifier.core.reconstruct.refine` moves every ARMOR Linear's ``A``, ``B`` and kept
  core values (or a subset) by Adam on the layer's output error, keeping the best iterate on
  held-out guard windows.

During the calibration pass two hooks on each decoder layer (an element of an ``nn.ModuleList``
that contains targets) capture its inputs ``X_i`` (positional and keyword arguments: rotary
embeddings, attention mask) and its dense output ``f(X_i)``, one entry per calibration batch;
they are freed when the layer is done, so activations are held for one layer at a time. With
``reconstruction_target="model"`` a second stream carries the *dense model's* hidden states from
layer to layer (the dense layer applied to the dense stream before it is compressed).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from torch import nn
from tqdm import tqdm

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.reconstruct import RefinementResult, RefinementSettings, refine
from armor_modifier.runtime import (
    ARMOR_A,
    ARMOR_B,
    apply_input_wrapper,
    apply_output_wrapper_around_bias,
    detach_wrappers,
    is_armor_linear,
)

from .parallel import all_gather_objects, broadcast_tensors, is_distributed, rank_and_world

if TYPE_CHECKING:
    from .base import ARMORModifier

__all__ = ["LayerRefinement", "Reconstruction", "decoder_layers", "summarize_refinements"]


@dataclass(frozen=True)
class LayerRefinement:
    """The reconstruction of one decoder layer (plain data, gathered across ranks).

    :ivar layer: the layer's name, e.g. ``model.layers.3``
    :ivar result: guard errors before and after, the step kept, whether it rolled back
    :ivar num_windows: calibration windows (batches) fitted plus held out
    """

    layer: str
    result: RefinementResult
    num_windows: int

    def log_line(self) -> str:
        r = self.result
        if r.rolled_back:
            what = f"non-finite at step {r.steps_run}: rolled back to the unrefined factors"
        elif r.accepted:
            what = f"kept step {r.best_step} ({r.gain:.1%} lower)"
        else:
            what = "no step beat the start on the guard windows: unrefined factors kept"
        return (
            f"ARMOR reconstruction {self.layer}: guard error {r.initial_error:.5f} -> "
            f"{r.final_error:.5f}, {what}, {r.steps_run} steps on {self.num_windows} windows, "
            f"{r.seconds:.1f} s"
        )


def summarize_refinements(refinements: list[LayerRefinement]) -> str:
    """One line: layers refined, mean guard-error gain, rollbacks and time."""
    if not refinements:
        return "ARMOR reconstruction: no layer refined"
    gains = [r.result.gain for r in refinements]
    return (
        f"ARMOR reconstruction: {len(refinements)} layers, mean guard-error gain "
        f"{sum(gains) / len(gains):.1%} (best {max(gains):.1%}), "
        f"{sum(r.result.accepted for r in refinements)} refined, "
        f"{sum(r.result.rolled_back for r in refinements)} rolled back (non-finite), "
        f"{sum(r.result.seconds for r in refinements):.1f} s"
    )


def decoder_layers(
    model: nn.Module, targets: dict[str, nn.Linear]
) -> tuple[dict[str, nn.Module], dict[nn.Linear, str]]:
    """``{name: layer}`` of the ``nn.ModuleList`` elements that contain targets (model order),
    and each target's innermost such layer, ``{target: layer name}``.

    :raises ARMORValueError: naming a target that lies in no such layer
    """
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for index, child in enumerate(module):
                layers[f"{name}.{index}" if name else str(index)] = child
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


@dataclass
class _Capture:
    """One layer's calibration windows: inputs, keyword arguments and dense outputs."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    call_order: list[tuple[nn.Linear, torch.Tensor]] = field(default_factory=list)


class _StopReplay(Exception):
    """Raised by a hook to end a replay once the statistics it needs are in."""


def _hidden(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


class Reconstruction:
    """Captures decoder-layer windows and runs propagation and refinement for one modifier."""

    def __init__(self, modifier: ARMORModifier, model: nn.Module) -> None:
        self.modifier = modifier
        self.layers, self._owner = decoder_layers(model, modifier.target_modules)
        self._captures: dict[nn.Module, _Capture] = {}
        self._dense_stream: list[torch.Tensor] | None = None
        self._checked: set[type] = set()
        self._recording: _Capture | None = None
        self._quiet = False
        self.refinements: list[LayerRefinement] = []

    @property
    def settings(self) -> RefinementSettings:
        return self.modifier.refinement_settings

    # ---- capture ---------------------------------------------------------------------------

    def register_hooks(self) -> None:
        """Hook every decoder layer (inputs and outputs) and every target (call order)."""
        pre: Callable[..., None] = self._pre_hook
        post: Callable[..., None] = self._post_hook
        order: Callable[..., None] = self._linear_hook
        for layer in self.layers.values():
            self.modifier.register_hook(layer, pre, "forward_pre", with_kwargs=True)
            self.modifier.register_hook(layer, post, "forward", with_kwargs=True)
        for module in self._owner:
            self.modifier.register_hook(module, order, "forward_pre")

    def _pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._quiet:
            return
        capture = self._captures.setdefault(layer, _Capture())
        capture.args.append(tuple(_detach(a) for a in args))
        capture.kwargs.append({k: _detach(v) for k, v in kwargs.items()})
        self._recording = capture if not capture.outputs else None

    def _linear_hook(self, module: nn.Linear, args: tuple) -> None:
        if self._recording is not None and not self._quiet:
            # the tensor itself, not its id: a freed input's id can be reused by the next one
            self._recording.call_order.append((module, args[0]))

    def _post_hook(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        if self._quiet:
            return
        self._recording = None
        capture = self._captures[layer]
        hidden = _first(output)
        if not isinstance(hidden, torch.Tensor) or hidden.shape != _hidden(args, kwargs).shape:
            raise ARMORValueError(
                f"{type(layer).__name__} returns {type(output).__name__}, not its hidden states "
                "(a tensor shaped like its input, or a tuple starting with one), so ARMOR cannot "
                "replay it for propagate_within_layer / reconstruction_steps; leave both off"
            )
        capture.outputs.append(hidden.detach())
        if type(layer) not in self._checked:
            self._check_replay(layer, capture)

    def _check_replay(self, layer: nn.Module, capture: _Capture) -> None:
        """Replay the first window and demand the captured output (before any compression)."""
        name = type(layer).__name__
        try:
            replayed = self.forward(layer, 0, capture)
        except Exception as err:  # noqa: BLE001  (any failure means: cannot replay)
            raise ARMORValueError(
                f"{name} cannot be replayed from the inputs its hooks captured ({err!r}); "
                "propagate_within_layer / reconstruction_steps do not support this architecture"
            ) from err
        if not torch.allclose(replayed, capture.outputs[0], rtol=1e-4, atol=1e-5):
            raise ARMORValueError(
                f"{name} gives a different output when replayed from its captured inputs (max "
                f"difference {float((replayed - capture.outputs[0]).abs().max()):.3g}); its "
                "forward depends on state the hooks do not see, so propagate_within_layer / "
                "reconstruction_steps do not support it"
            )
        self._checked.add(type(layer))

    @contextmanager
    def _replaying(self, keep_hooks: bool = False) -> Iterator[None]:
        """Run the layer without capturing (and, unless ``keep_hooks``, without any modifier
        hook, so no statistics are added)."""
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
        self, layer: nn.Module, i: int, capture: _Capture, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's hidden-state output for window ``i`` (``hidden`` replaces its input)."""
        args, kwargs = capture.args[i], capture.kwargs[i]
        if hidden is not None:
            args, kwargs = _with_hidden(args, kwargs, hidden)
        with self._replaying():
            return _first(layer(*args, **kwargs))

    def release(self) -> None:
        """Drop every captured activation (the refinement results stay)."""
        self._captures = {}
        self._dense_stream = None
        self._recording = None

    # ---- per layer -------------------------------------------------------------------------

    def process(self, modules: list[nn.Linear]) -> None:
        """Compress ``modules`` (this subgraph's pending targets) layer by layer, with
        propagation and refinement as configured, then free the layers' captures."""
        by_layer: dict[str, list[nn.Linear]] = {}
        for module in modules:
            by_layer.setdefault(self._owner[module], []).append(module)
        for name, layer in self.layers.items():
            if name not in by_layer:
                continue
            capture = self._captures.pop(layer, _Capture())
            if not capture.outputs:
                self.modifier.compress_modules(by_layer[name])
                continue
            refining = self.settings.steps > 0
            targets = self._targets(layer, capture) if refining else []
            if self.modifier.propagate_within_layer:
                self._compress_in_order(layer, capture, by_layer[name])
            else:
                self.modifier.compress_modules(by_layer[name])
            if refining:
                self._refine(name, layer, capture, targets)

    def _targets(self, layer: nn.Module, capture: _Capture) -> list[torch.Tensor]:
        """``T_i``: the dense layer's outputs, or the dense model's stream pushed through it."""
        if self.modifier.reconstruction_target == "layer":
            return capture.outputs
        stream = self._dense_stream
        if stream is None or len(stream) != len(capture.outputs):
            stream = [_hidden(a, k) for a, k in zip(capture.args, capture.kwargs, strict=True)]
        with torch.no_grad():
            self._dense_stream = [self.forward(layer, i, capture, h) for i, h in enumerate(stream)]
        return self._dense_stream

    def _compress_in_order(
        self, layer: nn.Module, capture: _Capture, modules: list[nn.Linear]
    ) -> None:
        """Compress groups of Linears sharing one input in call order, re-collecting each later
        group's statistics from a replay through the already compressed groups."""
        groups = _input_groups(capture.call_order, modules)
        self.modifier.compress_modules(groups[0])
        for group in groups[1:]:
            pending = [m for m in modules if not is_armor_linear(m)]
            for module in pending:
                self.modifier.statistics[module] = self.modifier.empty_statistics(module)
            stop = group[-1].register_forward_hook(_stop_replay)
            try:
                with torch.no_grad(), self._replaying(keep_hooks=True):
                    for i in range(len(capture.outputs)):
                        args, kwargs = capture.args[i], capture.kwargs[i]
                        try:
                            layer(*args, **kwargs)
                        except _StopReplay:
                            pass
            finally:
                stop.remove()
            self.modifier.compress_modules(group)

    def _refine(
        self, name: str, layer: nn.Module, capture: _Capture, targets: list[torch.Tensor]
    ) -> None:
        """Refine every ARMOR Linear of ``layer`` jointly; write the kept iterate back.

        Under torchrun every rank gathers all ranks' windows (in rank order) and runs the same
        refinement, so each rank's result is the single process's on the same windows.
        """
        if is_distributed():
            capture, targets = _gathered(capture, targets)
        linears = {
            rel: module
            for rel, module in layer.named_modules()
            if isinstance(module, nn.Linear) and is_armor_linear(module)
        }
        moving = self.modifier.reconstruction_parameters
        params: list[torch.Tensor] = []
        masks: list[torch.Tensor | None] = []
        names: list[tuple[str, nn.Linear, str]] = []
        for rel, module in linears.items():
            if moving in ("all", "core"):
                weight = module.weight.detach().float().clone()
                params.append(weight)
                masks.append((weight != 0).float())
                names.append((rel, module, "weight"))
            if moving in ("all", "wrappers"):
                for buffer in (ARMOR_A, ARMOR_B):
                    params.append(getattr(module, buffer).detach().float().clone())
                    masks.append(None)
                    names.append((rel, module, buffer))

        def run(i: int) -> torch.Tensor:
            return self.forward(layer, i, capture)

        settings = self.settings
        seeded = dataclasses.replace(
            settings, seed=(settings.seed + zlib.crc32(name.encode())) % 2**31
        )
        rank, _ = rank_and_world()
        bar = tqdm(
            total=settings.steps,
            desc=f"ARMOR reconstruction {name}",
            leave=False,
            disable=rank != 0,
        )
        inputs = [_hidden(a, k) for a, k in zip(capture.args, capture.kwargs, strict=True)]
        try:
            with torch.enable_grad(), _trainable(self.modifier, linears, names, params):
                result = refine(
                    run,
                    inputs,
                    targets,
                    params,
                    masks,
                    seeded,
                    progress=lambda step, loss: bar.update(1),
                )
        finally:
            bar.close()
        if is_distributed():
            # every rank ran the same refinement on the same gathered windows (the offload
            # cache's collectives need every rank to touch the modules alike); rank 0's result
            # is made everyone's, so no rounding difference can split the ranks
            broadcast_tensors([p.contiguous() for p in params], src=0)
            result = all_gather_objects(result)[0]
        refinement = LayerRefinement(name, result, len(capture.outputs))
        if result.accepted:
            self._write_back(linears, names, params)
        self.refinements.append(refinement)
        if rank == 0:
            logger.info(refinement.log_line())

    def _write_back(
        self, linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
    ) -> None:
        values = {(rel, attr): p for (rel, _, attr), p in zip(names, params, strict=True)}
        for rel, module in linears.items():
            A = values.get((rel, ARMOR_A), getattr(module, ARMOR_A))
            B = values.get((rel, ARMOR_B), getattr(module, ARMOR_B))
            core = values.get((rel, "weight"), module.weight.detach())
            self.modifier.apply(module, A.detach(), B.detach(), core.detach())


@contextmanager
def _trainable(
    modifier: ARMORModifier,
    linears: dict[str, nn.Linear],
    names: list[tuple[str, nn.Linear, str]],
    params: list[torch.Tensor],
) -> Iterator[None]:
    """Make ``linears`` compute ``A (W (B x)) + bias`` from the tensors in ``params`` (the
    module's own values for what does not move), so gradients reach them.

    The ARMOR hooks are swapped for hooks and a forward that read ``params`` (llm-compressor's
    offload cache copies assigned tensors into its own, so the buffers cannot simply be
    replaced); on exit the modules get their own wrappers back, unchanged.
    """
    values = {(rel, attr): p for (rel, _, attr), p in zip(names, params, strict=True)}
    saved = {}
    handles = []
    for rel, module in linears.items():
        A0, B0 = getattr(module, ARMOR_A).detach(), getattr(module, ARMOR_B).detach()
        saved[module] = (A0, B0, module.__dict__.get("forward"))
        A = values.get((rel, ARMOR_A), A0)
        B = values.get((rel, ARMOR_B), B0)
        W = values.get((rel, "weight"))
        detach_wrappers(module)
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, B=B: (apply_input_wrapper(args[0], B), *args[1:])
            )
        )
        handles.append(
            module.register_forward_hook(
                lambda m, _args, y, A=A: apply_output_wrapper_around_bias(y, A, m.bias)
            )
        )
        if W is not None:
            setattr(module, "forward", _linear_forward(module, W))  # noqa: B010
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, (A0, B0, forward) in saved.items():
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                setattr(module, "forward", forward)  # noqa: B010  (an instance attribute)
            modifier.apply(module, A0, B0, module.weight.detach())


def _linear_forward(module: nn.Linear, W: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, W.to(x.dtype), module.bias)

    return forward


def _stop_replay(_module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
    raise _StopReplay


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _input_groups(
    call_order: list[tuple[nn.Linear, torch.Tensor]], modules: list[nn.Linear]
) -> list[list[nn.Linear]]:
    """``modules`` split into consecutive runs of the recorded call order that share one input
    tensor (the same object); modules never seen in the recording go last, one group."""
    wanted = set(modules)
    groups: list[list[nn.Linear]] = []
    last_input = None
    seen: set[nn.Linear] = set()
    for module, x in call_order:
        if module not in wanted or module in seen:
            continue
        seen.add(module)
        if groups and x is last_input:
            groups[-1].append(module)
        else:
            groups.append([module])
        last_input = x
    rest = [m for m in modules if m not in seen]
    return groups + ([rest] if rest else [])


def _gathered(
    capture: _Capture, targets: list[torch.Tensor]
) -> tuple[_Capture, list[torch.Tensor]]:
    """Every rank's windows, in rank order (so ranks holding consecutive shards of the
    calibration set see the single-process order)."""
    parts = all_gather_objects((capture.args, capture.kwargs, capture.outputs, targets))
    merged = _Capture()
    merged_targets: list[torch.Tensor] = []
    for args, kwargs, outputs, part_targets in parts:
        merged.args += args
        merged.kwargs += kwargs
        merged.outputs += outputs
        merged_targets += part_targets
    return merged, merged_targets
