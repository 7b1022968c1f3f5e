"""Decoder-layer work (docs/algorithm.md, "Decoder-layer reconstruction"): within-layer
propagation and reconstruction, run where the sequential pipeline ends a subgraph, before it
propagates the compressed layer's outputs upward.

- **within-layer propagation** (``propagate_within_layer``): the layer's Linears are compressed in
  the order the forward calls them, in groups that share one input (q/k/v, then o, then gate/up,
  then down). Before each later group the layer is replayed on its captured inputs, with the
  earlier groups already compressed, to collect that group's statistics afresh.
- **reconstruction** (``reconstruction_steps > 0``): after the layer is compressed,
  :func:`armor_modifier.core.reconstruct.reconstruct_layer` moves every ARMOR Linear's ``A``,
  ``B`` and kept core values (or a subset) by Adam on the layer's output error, keeping the best
  iterate on held-out guard windows.

:class:`Reconstruction` is driven by explicit callables (compress a list of Linears, start their
statistics afresh, register a hook) and one frozen :class:`ReconstructionSettings`; it knows
nothing of the modifier that owns it. Activations are held for one layer at a time
(:mod:`.capture`). With ``reconstruction_target="model"`` a second stream carries the *dense
model's* hidden states from layer to layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from loguru import logger
from torch import nn
from tqdm import tqdm

from armor_modifier.core.reconstruct import (
    ReconstructionResult,
    ReconstructionSettings,
    reconstruct_layer,
)
from armor_modifier.core.settings import derived_seed
from armor_modifier.runtime import (
    ARMOR_A,
    ARMOR_B,
    armor_linears,
    detach_wrappers,
    forward_with_core,
    hook_wrappers,
    is_armor_linear,
)

from .capture import Capture, LayerCapture, decoder_layers
from .collectives import all_gather_objects, broadcast_tensors, is_distributed, rank_and_world
from .compressor import apply_factors
from .units import Block, block_output, blocks_of, recording_outputs

__all__ = ["LayerReconstruction", "Reconstruction", "summarize_reconstructions"]


@dataclass(frozen=True)
class LayerReconstruction:
    """The reconstruction of one decoder layer (plain data, gathered across ranks).

    :ivar layer: the layer's name, e.g. ``model.layers.3``
    :ivar result: guard errors before and after, the step kept, whether it rolled back
    :ivar num_windows: calibration windows (batches) fitted plus held out
    :ivar what: the work's name in the log (the reconstruction after GPTQ has its own)
    """

    layer: str
    result: ReconstructionResult
    num_windows: int
    what: str = "ARMOR reconstruction"

    def log_line(self) -> str:
        r = self.result
        if r.rolled_back:
            outcome = f"non-finite at step {r.steps_run}: rolled back to the unrefined factors"
        elif r.accepted:
            outcome = f"kept step {r.best_step} ({r.gain:.1%} lower)"
        else:
            outcome = "no step beat the start on the guard windows: unrefined factors kept"
        return (
            f"{self.what} {self.layer}: guard error {r.initial_error:.5f} -> "
            f"{r.final_error:.5f}, {outcome}, {r.steps_run} steps on {self.num_windows} windows, "
            f"{r.seconds:.1f} s" + (f", {r.precision} autocast" if r.precision != "float32" else "")
        )


def summarize_reconstructions(
    layers: list[LayerReconstruction], what: str = "ARMOR reconstruction"
) -> str:
    """One line, headed ``what``: layers reconstructed, mean gain, rollbacks and time."""
    if not layers:
        return f"{what}: no layer reconstructed"
    gains = [r.result.gain for r in layers]
    return (
        f"{what}: {len(layers)} layers, mean guard-error gain "
        f"{sum(gains) / len(gains):.1%} (best {max(gains):.1%}), "
        f"{sum(r.result.accepted for r in layers)} improved, "
        f"{sum(r.result.rolled_back for r in layers)} rolled back (non-finite), "
        f"{sum(r.result.seconds for r in layers):.1f} s"
    )


class _StopReplay(Exception):
    """Raised by a hook to end a replay once the statistics it needs are in."""


class Reconstruction:
    """Within-layer propagation and reconstruction of every decoder layer holding targets.

    :param model: the model being compressed.
    :param targets: ``{name: Linear}`` of every target, model order.
    :param settings: the decoder-layer settings.
    :param compress: compresses a list of target Linears (statistics to factors, written back).
    :param reset_statistics: starts the given targets' statistics afresh.
    :param register_hook: the hook owner's ``register_hook`` (llm-compressor's ``HooksMixin``).
    :param optional: a decoder layer that cannot be replayed turns the work off (a warning;
        every layer then compressed per Linear) instead of raising (an unset
        ``reconstruction_steps``, :mod:`.layer_defaults`).

    What a fit moves, how the layer computes from it and how it is written back are
    :meth:`_fit_parameters`, :meth:`_trainable` and :meth:`_write_back` (the reconstruction after
    GPTQ, :mod:`.gptq_reconstruction`, moves scales instead of cores).
    """

    #: the work's name in the log lines
    what = "ARMOR reconstruction"

    def __init__(
        self,
        model: nn.Module,
        targets: dict[str, nn.Linear],
        settings: ReconstructionSettings,
        compress: Callable[[list[nn.Linear]], None],
        reset_statistics: Callable[[list[nn.Linear]], None],
        register_hook: Callable[..., Any],
        optional: bool = False,
    ) -> None:
        self.settings = settings
        self._compress = compress
        self._reset_statistics = reset_statistics
        layers, self._owner = decoder_layers(model, targets)
        self.capture = LayerCapture(layers, list(self._owner), register_hook, optional)
        self._dense_stream: list[torch.Tensor] | None = None
        self.reconstructions: list[LayerReconstruction] = []

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self.capture.layers

    def register_hooks(self) -> None:
        """Capture every decoder layer's windows during the calibration pass."""
        self.capture.register_hooks()

    def release(self) -> None:
        """Drop every captured activation (the results stay)."""
        self.capture.release()
        self._dense_stream = None

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
            capture = self.capture.pop(layer)
            if not capture.outputs:
                self._compress(by_layer[name])
                continue
            fitting = self.settings.fit_steps > 0
            blocks = (blocks_of(layer, by_layer[name], capture.call_order)
                      if fitting and self.settings.unit == "block" else [])  # fmt: skip
            targets, block_targets = self._targets(layer, capture, blocks) if fitting else ([], [])
            if self.settings.propagate_within_layer:
                self._compress_in_order(layer, capture, by_layer[name])
            else:
                self._compress(by_layer[name])
            if fitting:
                self._reconstruct(name, layer, capture, [*block_targets, targets], blocks)

    def skip(self, modules: list[nn.Linear], restore: Callable[[], None]) -> None:
        """Take ``modules``' layers as done elsewhere (loaded progress): free their captures,
        push the dense stream (``target="model"``) through them while still dense, then run
        ``restore``."""
        owners = {self._owner[module] for module in modules}
        fits_to_model = self.settings.fit_steps > 0 and self.settings.target == "model"
        for name, layer in self.layers.items():
            if name in owners:
                capture = self.capture.pop(layer)
                if capture.outputs and fits_to_model:
                    self._targets(layer, capture, [])
        restore()

    def _targets(
        self, layer: nn.Module, capture: Capture, blocks: list[Block]
    ) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """``T_i``: the dense layer's outputs, or the dense model's stream pushed through it;
        and per block but the last, the dense block's outputs in those same forwards."""
        inner = [block.module for block in blocks[:-1]]
        with recording_outputs(inner) as recorded, torch.no_grad():
            if self.settings.target == "layer":
                for i in range(len(capture.outputs) if inner else 0):
                    self.capture.forward(layer, i, capture)
                return capture.outputs, recorded
            stream = self._dense_stream
            if stream is None or len(stream) != len(capture.outputs):
                stream = capture.inputs()
            self._dense_stream = [
                self.capture.forward(layer, i, capture, h) for i, h in enumerate(stream)
            ]
        return self._dense_stream, recorded

    def _compress_in_order(
        self, layer: nn.Module, capture: Capture, modules: list[nn.Linear]
    ) -> None:
        """Compress groups of Linears sharing one input in call order, re-collecting each later
        group's statistics from a replay through the already compressed groups."""
        groups = _input_groups(capture.call_order, modules)
        self._compress(groups[0])
        for group in groups[1:]:
            self._reset_statistics([m for m in modules if not is_armor_linear(m)])
            stop = group[-1].register_forward_hook(_stop_replay)
            try:
                with torch.no_grad(), self.capture.replaying(keep_hooks=True):
                    for i in range(len(capture.outputs)):
                        args, kwargs = capture.args[i], capture.kwargs[i]
                        try:
                            layer(*args, **kwargs)
                        except _StopReplay:
                            pass
            finally:
                stop.remove()
            self._compress(group)

    def _reconstruct(
        self,
        name: str,
        layer: nn.Module,
        capture: Capture,
        targets: list[list[torch.Tensor]],
        blocks: list[Block],
    ) -> None:
        """Fit ``layer``'s ARMOR Linears jointly (``blocks`` empty; ``targets``: the layer's
        alone) or block by block (``targets``: each block's, the layer's last); write the kept
        iterates back.

        Under torchrun every rank gathers all ranks' windows (in rank order) and runs the same
        refinement, so each rank's result is the single process's on the same windows.
        """
        if is_distributed():
            capture, targets = _gathered(capture, targets)
        linears = armor_linears(layer)

        def run_layer(i: int) -> torch.Tensor:
            return self.capture.forward(layer, i, capture)

        if not blocks:
            self._fit(name, linears, run_layer, capture.inputs(), targets[-1])
            return
        zeros = [torch.zeros(())] * len(capture.outputs)  # a block's error is relative to |T|
        for k, block in enumerate(blocks):
            mine = {rel: m for rel, m in linears.items() if m in block.linears}
            if k == len(blocks) - 1:
                self._fit(f"{name}.{block.name}", mine, run_layer, capture.inputs(), targets[k])
            else:
                def run_block(i: int, module: nn.Module = block.module) -> torch.Tensor:
                    return block_output(lambda: run_layer(i), module)

                self._fit(f"{name}.{block.name}", mine, run_block, zeros, targets[k])

    def _fit(
        self,
        name: str,
        linears: dict[str, nn.Linear],
        run: Callable[[int], torch.Tensor],
        inputs: list[torch.Tensor],
        targets: list[torch.Tensor],
    ) -> None:
        """One unit: Adam on ``linears``' factors, ``run(i)`` against ``targets[i]`` relative to
        ``targets[i] - inputs[i]``; the kept iterate written back, the result recorded."""
        params, masks, names = self._fit_parameters(linears)
        settings = self.settings
        seeded = dataclasses.replace(settings, seed=derived_seed(settings.seed, name, 31))
        rank, _ = rank_and_world()
        bar = tqdm(total=settings.fit_steps, desc=f"{self.what} {name}", leave=False,
                   disable=rank != 0)  # fmt: skip
        try:
            with torch.enable_grad(), self._trainable(linears, names, params):
                result = reconstruct_layer(run, inputs, targets, params, masks, seeded,
                                           progress=lambda step, loss: bar.update(1))  # fmt: skip
        finally:
            bar.close()
        if is_distributed():
            # every rank ran the same refinement on the same gathered windows (the offload
            # cache's collectives need every rank to touch the modules alike); rank 0's result
            # is made everyone's, so no rounding difference can split the ranks
            broadcast_tensors([p.contiguous() for p in params], src=0)
            result = all_gather_objects(result)[0]
        done = LayerReconstruction(name, result, len(targets), self.what)
        if result.accepted:
            self._write_back(linears, names, params)
        self.reconstructions.append(done)
        if rank == 0:
            logger.info(done.log_line())

    def _fit_parameters(
        self, linears: dict[str, nn.Linear]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[tuple[str, nn.Linear, str]]]:
        """What moves in ``linears`` (:func:`factor_parameters` of the settings' set)."""
        return factor_parameters(linears, self.settings.parameters)

    def _trainable(
        self, linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
    ) -> AbstractContextManager[None]:
        """Inside: ``linears`` compute from ``params`` (:func:`trainable_factors`)."""
        return trainable_factors(linears, names, params)

    def _write_back(
        self, linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
    ) -> None:
        """Give ``linears`` the kept iterate (:func:`write_back_factors`)."""
        write_back_factors(linears, names, params)


def factor_parameters(
    linears: dict[str, nn.Linear], moving: str
) -> tuple[list[torch.Tensor], list[torch.Tensor | None], list[tuple[str, nn.Linear, str]]]:
    """Float32 copies of what moves in ``linears`` (``moving``: 'all', 'wrappers' or 'core').

    :return: ``(params, masks, names)``: per tensor a core (its 0/1 mask, so it stays 2:4) or
        a wrapper ``A [p, b, b]`` / ``B [q, b, b]`` (mask ``None``), named ``(key, module,
        'weight' | 'armor_A' | 'armor_B')``
    """
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
    return params, masks, names


def write_back_factors(
    linears: dict[str, nn.Linear], names: list, params: list[torch.Tensor]
) -> None:
    """Give every module of ``linears`` the values in ``params`` (named as by
    :func:`factor_parameters`), its own for the rest."""
    values = {(rel, attr): p for (rel, _, attr), p in zip(names, params, strict=True)}
    for rel, module in linears.items():
        A = values.get((rel, ARMOR_A), getattr(module, ARMOR_A))
        B = values.get((rel, ARMOR_B), getattr(module, ARMOR_B))
        core = values.get((rel, "weight"), module.weight.detach())
        apply_factors(module, A.detach(), B.detach(), core.detach())


@contextmanager
def trainable_factors(
    linears: dict[str, nn.Linear],
    names: list[tuple[str, nn.Linear, str]],
    params: list[torch.Tensor],
) -> Iterator[None]:
    """Make ``linears`` compute ``A (W (B x)) + bias`` from the tensors in ``params`` (the
    module's own values for what does not move), so gradients reach them.

    The ARMOR hooks are swapped for the runtime's hooks on the ``A`` and ``B`` above
    (:func:`~armor_modifier.runtime.hook_wrappers`) and, when the core moves, for a forward on it
    (:func:`~armor_modifier.runtime.forward_with_core`): llm-compressor's offload cache copies
    assigned tensors into its own, so the buffers cannot simply be replaced. On exit the modules
    get their own wrappers back, unchanged.
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
        handles += hook_wrappers(module, A, B)
        if W is not None:
            setattr(module, "forward", forward_with_core(module, W))  # noqa: B010
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
            apply_factors(module, A0, B0, module.weight.detach())


def _stop_replay(_module: nn.Module, _args: tuple, _output: torch.Tensor) -> None:
    raise _StopReplay


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
    capture: Capture, targets: list[list[torch.Tensor]]
) -> tuple[Capture, list[list[torch.Tensor]]]:
    """Every rank's windows, in rank order (so ranks holding consecutive shards of the
    calibration set see the single-process order)."""
    parts = all_gather_objects((capture.args, capture.kwargs, capture.outputs, targets))
    merged = Capture()
    merged_targets: list[list[torch.Tensor]] = [[] for _ in targets]
    for args, kwargs, outputs, part_targets in parts:
        merged.args += args
        merged.kwargs += kwargs
        merged.outputs += outputs
        for mine, theirs in zip(merged_targets, part_targets, strict=True):
            mine += theirs
    return merged, merged_targets
