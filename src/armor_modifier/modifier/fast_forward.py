"""A resumed run skips the forward passes of the layers it loads (:mod:`.progress`).

llm-compressor's sequential pipeline runs every decoder layer twice per calibration batch (a
calibration pass, then, after compression, a propagation pass), also a layer loaded from the
progress folder, so a resumed run would pay two forward passes per loaded layer to rebuild the
next layer's inputs. To skip them, a run with a progress folder also keeps
``frontier.safetensors``: the calibration inputs of the decoder layer it is about to solve, one
tensor per calibration batch, exactly as the pipeline fed them, written once that layer's
calibration pass is over (before it is solved; atomically, without fsync: a lost or damaged file
only costs the slow path), for the first layer after layer 0 and then whenever
:data:`WRITE_SPACING` times the last write's duration has passed (a resumed run forwards through
the loaded layers after the frontier). Beside the tensors the file records:

- ``keys``: per batch, a SHA-256 of everything the first decoder layer was called with in that
  batch (:func:`batch_key`): the resumed run matches its batches to the stored ones by it, so a
  different batch order still finds each batch's tensor;
- ``chain``: every earlier layer's progress file and its checksum; ``others``: a SHA-256 of the
  parameters and buffers outside the targets (norms) of those layers and the frontier layer;
- whether the pipeline propagates (``propagate_error``), and the progress folder's run digest.

The frontier layer's own file, once solved, records the frontier's checksum. A resumed run uses
the frontier when every chained file passes its checks now (checksum, run, the current dense
weights) and ``others`` and ``propagates`` match. It then replaces the forwards of the chained
layers (and of the frontier layer, when its file was solved from this frontier and the pipeline
propagates) before the first batch: the first layer admits each calibration batch by its key
(the first foreign batch turns skipping off and everything runs as without a frontier; a foreign
batch after admitted ones, or another number of batches, stops the run before any work, since
the admitted batches collected no statistics); layers before the frontier layer's predecessor
return their input; the predecessor returns the stored inputs of the batch (found by the
SHA-256 of its hidden input, which the identities pass on unchanged); the frontier layer, when
skipped, returns its input in the calibration pass, whose output the pipeline drops, and runs
for real, with its loaded factors, in the propagation pass. The layer after it then sees exactly
the uninterrupted run's inputs. Skipped layers collect no statistics and are loaded on their
weights and checksums alone.

Used only where nothing else needs the skipped passes: one process (no torchrun), no other
modifier in the recipe, no reconstruction against the dense model's stream (``target="model"``),
every decoder layer of the model holding targets, and, checked once per run on the first two
layers, each layer's inputs being exactly its predecessor's outputs. Anything else takes the slow
path, which loads the same layers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from llmcompressor.core import active_session
from llmcompressor.modifiers.utils.hooks import HooksMixin
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from armor_modifier.core.errors import ARMORValueError

from .capture import first_tensor, hidden_of
from .digest import tensors_sha256 as _digest

__all__ = ["FRONTIER", "WRITE_SPACING", "FastForward", "LayerProgress", "batch_key"]

FRONTIER = "frontier.safetensors"
#: a frontier is written again once this many times the last write's duration has passed, so the
#: writes take at most about 1 / WRITE_SPACING of the run; the frontier lags by more than a layer
#: only where one write takes more than 1 / WRITE_SPACING of a layer's time
WRITE_SPACING = 50


class LayerProgress(Protocol):
    """What this module uses of :class:`.progress.LayerProgress`."""

    folder: Path
    run_digest: str
    checksums: dict[str, str]
    layer_names: list[str]
    world: int
    seconds: float
    fast_forward: FastForward | None

    def verify(self, key: str, expect: Mapping[str, str]) -> tuple[str | None, str | None]: ...

    def skip_inputs(self, weights: Mapping[str, str]) -> None: ...


def _tensors(value: Any) -> list[Any]:
    """Every tensor in ``value`` (nested tuples / lists / dicts) and a token for anything else."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in [k, *_tensors(value[k])]]
    return [repr(value) if value is None or isinstance(value, bool | int | float | str) else
            type(value).__name__]  # fmt: skip


def batch_key(args: tuple, kwargs: Mapping[str, Any]) -> str:
    """SHA-256 over every argument of a decoder-layer call: each tensor's dtype, shape and bytes,
    and each plain value's ``repr``."""
    digest = hashlib.sha256()
    for item in _tensors((tuple(args), dict(kwargs))):
        digest.update(f"{_digest([item]) if isinstance(item, torch.Tensor) else item};".encode())
    return digest.hexdigest()


@dataclass
class _Plan:
    """A frontier that checked out: what it feeds and which layers it skips."""

    layer: str
    keys: list[str]
    inputs: dict[str, torch.Tensor]
    #: the layers loaded without their forward, and their dense weights' digests (checked)
    weights: dict[str, str]


class FastForward:
    """Keeps the frontier of a run and, when resuming, skips the loaded layers' passes.

    :param progress: the run's progress folder
    :param model: the model (its decoder layers are looked up by name)
    :param names: the decoder layers, model order (every one holds targets)
    :param targets: every target Linear (their parameters are left out of ``others``)
    :param register_hook: the hook owner's ``register_hook`` (llm-compressor's ``HooksMixin``:
        silent in the propagation pass and in replays)
    :param propagates: whether the pipeline runs a propagation pass (``propagate_error``)
    """

    def __init__(self, progress: LayerProgress, model: nn.Module, names: list[str],
                 targets: list[nn.Linear], register_hook: Callable[..., Any],
                 propagates: bool) -> None:  # fmt: skip
        self.progress = progress
        self._propagates = propagates
        self.path = progress.folder / FRONTIER
        self.layers = {name: model.get_submodule(name) for name in names}
        self._names = names
        self._name_of = {layer: name for name, layer in self.layers.items()}
        self._in_targets = {id(m) for t in targets for m in t.modules()}
        self._keys: dict[int, str] = {}
        self._key = ""
        self._inputs: dict[int, torch.Tensor] = {}
        self._started: list[str] = []
        self._ended: set[str] = set()
        self._first_outputs: set[str] = set()
        #: whether each layer's inputs were seen to be its predecessor's outputs (layers 0 -> 1)
        self._verified: bool | None = None
        self._plan: _Plan | None = None
        self._by_hidden: dict[str, str] = {}
        self._replaced: dict[nn.Module, Any] = {}
        self._due = True
        #: when the last frontier write ended and how long it took
        self._last_write: tuple[float, float] | None = None
        #: the last frontier written: (layer, checksum of its tensors)
        self.written: tuple[str, str] | None = None
        #: decoder layers loaded without their calibration pass (the frontier layer, when among
        #: them, still runs its propagation pass)
        self.skipped: list[str] = []
        self._output_hook = self.layers[names[0]].register_forward_hook(self._first_output)
        for layer in self.layers.values():
            register_hook(layer, self._on_call, "forward_pre", with_kwargs=True)

    # ---- hooks (calibration pass only, but for the first layer's outputs) --------------------

    def _first_output(self, _layer: nn.Module, _args: tuple, output: Any) -> None:
        if self._verified is None and not self._replaced:
            self._first_outputs.add(_digest([first_tensor(output)]))

    def _on_call(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Note the batch's key (first layer) or its input (every other layer)."""
        name = self._name_of[layer]
        if name in self._ended:
            return
        if not self._started or self._started[-1] != name:
            self._started.append(name)
            if self._replaced and name not in self.skipped:
                self._restore()
            self._due = self._write_due()
        batch = int(active_session().state.current_batch_idx)
        if name == self._names[0]:
            self._key = self._keys[batch] = batch_key(args, kwargs)
            return
        if self._replaced:
            return
        hidden = hidden_of(args, kwargs).detach()
        if self._verified is None and len(self._started) == 2:
            if _digest([hidden]) not in self._first_outputs:
                self._verified = False
                logger.info(f"ARMOR progress: {name}'s inputs are not its predecessor's outputs; "
                            "a resumed run will forward through loaded layers")  # fmt: skip
        if self._verified is not False and self._due:
            self._inputs[batch] = hidden.to("cpu")

    # ---- the skipped layers' forwards ------------------------------------------------------

    def _forward(self, name: str, real: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """A skipped layer's forward: its input (the frontier layer's calibration pass, and
        every layer before the frontier layer's predecessor), the stored inputs of the frontier
        layer (that predecessor), or the real forward (the frontier layer's propagation pass)."""
        plan, hidden = self._plan, hidden_of(args, kwargs)
        calibrating = not HooksMixin._HOOKS_DISABLED
        if plan is not None and name == self._names[0] and calibrating:
            self._admit(plan, hidden)
            plan = self._plan
        if plan is None:  # the first batch was not the stored run's: nothing skipped
            return real(*args, **kwargs)
        if name == plan.layer:
            return hidden if calibrating else real(*args, **kwargs)
        if self._names.index(name) < self._names.index(plan.layer) - 1:
            return hidden
        key = self._by_hidden.get(_digest([hidden]))
        if key is None:
            raise ARMORValueError(
                f"ARMOR progress: {name} got an input that no calibration batch gave "
                f"{self._names[0]}; delete {self.path} to resume through the loaded layers"
            )
        return plan.inputs[key].to(hidden.device, copy=True)

    def _admit(self, plan: _Plan, hidden: torch.Tensor) -> None:
        """The first layer's calibration batch: one of the stored run's, or give up skipping
        (first batch) or stop (a later one: earlier batches collected no statistics)."""
        if self._key in plan.inputs:
            self._by_hidden[_digest([hidden])] = self._key
        elif not self._by_hidden:
            logger.info(f"ARMOR progress: {FRONTIER} holds other calibration batches; "
                        "forwarding through the loaded layers")  # fmt: skip
            self._restore()
            self.progress.skip_inputs({})
            self.skipped = []
        else:
            raise ARMORValueError(
                f"ARMOR progress: a calibration batch differs from the stored run's ({self.path})"
                f" after {len(self._by_hidden)} that matched; run with the same calibration set, "
                f"or delete {self.path.name} to recompute from layer 0"
            )

    # ---- per unit --------------------------------------------------------------------------

    def before_unit(self, key: str) -> None:
        """Layer ``key``'s calibration pass is over: check the first layer's batches against
        the plan, or write the layer's inputs as the frontier."""
        self._ended.add(key)
        inputs, self._inputs = self._inputs, {}
        if self._plan is not None and key == self._names[0]:
            if sorted(self._keys.values()) != sorted(self._plan.keys):
                raise ARMORValueError(
                    f"ARMOR progress: {len(self._keys)} calibration batches here, "
                    f"{len(self._plan.keys)} in the stored run ({self.path}); run with the same "
                    f"calibration set, or delete {self.path.name} to recompute from layer 0"
                )
        if key == self._names[0] or key in self.skipped or self._verified is False:
            return
        self._verified = True
        self._output_hook.remove()
        self._first_outputs.clear()
        before = self._names[: self._names.index(key)]
        chain = {k: self.progress.checksums.get(k) for k in before}
        batches = sorted(inputs)
        if None in chain.values() or not batches or any(b not in self._keys for b in batches):
            return
        start = time.perf_counter()
        tensors = {f"inputs.{b}": inputs[b].contiguous() for b in batches}
        checksum = _digest([tensors[k] for k in sorted(tensors)])
        metadata = {
            "run": self.progress.run_digest,
            "layer": key,
            "keys": json.dumps([self._keys[b] for b in batches]),
            "chain": json.dumps(chain),
            "others": self._others([*before, key]),
            "propagates": json.dumps(self._propagates),
            "checksum": checksum,
        }
        temporary = self.path.with_name(f".{FRONTIER}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(temporary), metadata=metadata)
            os.replace(temporary, self.path)
        finally:
            temporary.unlink(missing_ok=True)
        self.written = (key, checksum)
        self._last_write = (time.perf_counter(), time.perf_counter() - start)

    def _write_due(self) -> bool:
        """Whether the layer starting now has its inputs kept and written: the first time, then
        once :data:`WRITE_SPACING` times the last write's duration has passed."""
        if self._last_write is None:
            return True
        end, seconds = self._last_write
        return time.perf_counter() - end >= WRITE_SPACING * seconds

    def release(self) -> None:
        """Give every layer its forward back and drop the hooks' state."""
        self._restore()
        self._output_hook.remove()
        self._inputs, self._first_outputs, self._by_hidden = {}, set(), {}

    # ---- the stored frontier ---------------------------------------------------------------

    def plan(self) -> None:
        """Read and check the frontier an earlier run left, if any; when it checks out, skip
        the layers before it (and the frontier layer's calibration pass when its file was
        solved from these inputs and the pipeline propagates)."""
        if not self.path.exists():
            return
        plan, why = self._read()
        if plan is None:
            logger.warning(f"ARMOR progress: {self.path} not used ({why}); forwarding through "
                           "the loaded layers")  # fmt: skip
            return
        self._plan = plan
        self.skipped = list(plan.weights)
        for name in self.skipped:
            self._replace(name)
        self.progress.skip_inputs(plan.weights)

    def _read(self) -> tuple[_Plan | None, str | None]:
        try:
            with safe_open(str(self.path), "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            keys, chain = json.loads(metadata["keys"]), json.loads(metadata["chain"])
            propagates = json.loads(metadata["propagates"])
        except Exception as err:  # a damaged file raises safetensors' or json's own errors
            return None, f"unreadable: {type(err).__name__}: {err}"
        if metadata.get("run") != self.progress.run_digest:
            return None, "written by another run"
        if metadata.get("checksum") != _digest([tensors[k] for k in sorted(tensors)]):
            return None, "the stored tensors fail their checksum"
        layer = metadata.get("layer")
        if layer not in self._names[1:] or list(chain) != self._names[: self._names.index(layer)]:
            return None, f"its layers ({layer}, {list(chain)}) are not this model's"
        if len(tensors) != len(keys) or propagates != self._propagates:
            return None, "the pipeline's propagate_error or the number of batches differ"
        weights: dict[str, str] = {}
        for name, checksum in chain.items():
            digest, why = self.progress.verify(name, {"checksum": checksum})
            if digest is None:
                return None, f"{name}: {why}"
            weights[name] = digest
        if metadata.get("others") != self._others([*chain, layer]):
            return None, "the decoder layers' other parameters (norms) differ"
        if propagates:  # the frontier layer's own file, solved from these very inputs
            digest, _why = self.progress.verify(layer, {"frontier": metadata["checksum"]})
            if digest is not None:
                weights[layer] = digest
        inputs = {key: tensors[f"inputs.{i}"] for i, key in enumerate(keys)}
        return _Plan(layer, keys, inputs, weights), None

    def frontier_of(self, key: str) -> str:
        """The checksum of the frontier layer ``key`` was solved from ("" if none)."""
        return self.written[1] if self.written and self.written[0] == key else ""

    def _others(self, names: list[str]) -> str:
        tensors: list[torch.Tensor] = []
        for name in names:
            for module in self.layers[name].modules():
                if id(module) not in self._in_targets:
                    tensors.extend(module.parameters(recurse=False))
                    tensors.extend(module.buffers(recurse=False))
        return _digest(tensors)

    def _replace(self, name: str) -> None:
        layer = self.layers[name]
        self._replaced[layer] = layer.__dict__.get("forward")
        real = layer.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            return self._forward(name, real, args, kwargs)

        layer.forward = forward

    def _restore(self) -> None:
        for layer, previous in self._replaced.items():
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
        self._replaced = {}
        self._plan = None
