"""Progress that outlives the process: each finished decoder layer's ARMOR factors on disk.

With ``ARMORModifier(progress_dir=DIR)`` every decoder layer's result (each target Linear's
``A``, ``B`` and core after any reconstruction, its :class:`~.report.ARMORModuleResult` and the
layer's reconstruction record) is written to ``DIR/<layer>.safetensors`` as soon as the layer is
done: into a hidden temporary file, fsynced, then renamed over the old one, so a kill at any
instant leaves the previous state usable. A later run with the same folder loads a layer instead
of solving it when the file's fingerprint matches what this run would solve from:

- ``run.json`` (written once): the package version, the recorded recipe (``modifier.settings()``),
  the targets and the number of ranks. Any difference refuses the folder before any work, with
  the keys that differ. Every layer file also carries a digest of the same, so a file of another
  run is not loaded even when ``run.json`` was deleted;
- per layer: SHA-256 of the targets' dense weights and biases and of their calibration statistics
  (``h``, ``H`` and the token count as the solver reads them: rounded once to float32 from float64
  sums, so the order of the calibration batches does not matter; under torchrun every rank's, in
  rank order), the digest of the layer's first target's inputs (:mod:`.digest`), and a
  SHA-256 checksum of the stored tensors. A mismatch, a truncated or corrupt file: that layer is
  recomputed (and its file rewritten), with a warning saying which.

A loaded layer does not need its statistics, only the check that it saw the stored run's inputs.
So a layer that follows a loaded unit, and whose file passes every check but the inputs when its
first calibration batch arrives, does not accumulate them (their float64 ``X^T X`` sums were most
of a loaded layer's time); its input digest is compared when it ends, and a mismatch stops the
run naming the file, since there is nothing to recompute it from (every layer before it was
loaded, so no work is lost). The first unit of a run always collects statistics, so a run on
other calibration data recomputes from there instead of stopping.

The loaded tensors are the ones the uninterrupted run computed, so the model, and every later
layer's calibration inputs (the sequential pipeline propagates through the loaded layer), are the
same bit for bit. Where nothing else needs them, a resumed run skips the loaded layers' forward
passes altogether, feeding the first layer it solves the inputs the stored run recorded
(:mod:`.fast_forward`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.reconstruct import ReconstructionResult
from armor_modifier.runtime import ARMOR_A, ARMOR_B
from armor_modifier.staging import replace_file

from .collectives import all_gather_objects, is_distributed, rank_and_world
from .compressor import LinearCompressor
from .digest import InputDigest
from .digest import tensors_sha256 as _digest
from .fast_forward import FastForward
from .fast_forward_setup import start_fast_forward
from .memory import decoder_layer_name
from .reconstruction import LayerReconstruction, Reconstruction
from .report import ARMORModuleResult
from .stats import InputStatistics

__all__ = [
    "FORMAT", "LayerProgress", "StoredLayer", "layer_key", "process_unit", "start_fast_forward",
]

FORMAT = "2"
RUN_FILE = "run.json"
StoredLayer = tuple[dict[str, tuple[torch.Tensor, ...]], list[ARMORModuleResult], list]
_PARTS = {
    "weights": "dense weights (another model?)",
    "statistics": "calibration statistics (other calibration data?)",
    "inputs": "calibration inputs (the digest of the first target's inputs)",
    "checksum": "stored tensors (the file changed since the frontier was written)",
    "frontier": "frontier (it was not solved from the stored inputs)",
}


@dataclass
class _Unit:
    """A decoder layer under calibration: its inputs' digest, and whether it skips statistics."""

    inputs: InputDigest = field(default_factory=InputDigest)
    skips_statistics: bool = False


def layer_key(names: Sequence[str]) -> str:
    """The file stem of a unit of work: its decoder layer (``model.layers.3``), or, for targets
    outside numbered layers or spanning several, the names joined and hashed."""
    layers = {decoder_layer_name(name) for name in names}
    if len(layers) == 1 and None not in layers:
        return str(layers.pop())
    return "targets-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _weights_digest(modules: Iterable[nn.Linear]) -> str:
    """SHA-256 of the modules' weights and biases, in order (the ``weights`` fingerprint)."""
    return _digest([t for m in modules for t in (m.weight, m.bias) if t is not None])


class LayerProgress:
    """One run's progress folder.

    :param folder: the progress folder (created if missing)
    :param run_info: what the whole run depends on (JSON-able; written to ``run.json`` once)
    :param names: every target and its name; decoder layers' targets are grouped by layer, and
        a layer's first target (in this order) has its inputs digested
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        run_info: Mapping[str, Any],
        names: Mapping[nn.Linear, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.rank, self.world = rank_and_world()
        self.run_info = {"format": FORMAT, **run_info, "world_size": self.world}
        #: every layer file carries this, so a file of another run is never loaded even when
        #: run.json was removed or replaced
        self.run_digest = hashlib.sha256(
            json.dumps(self.run_info, sort_keys=True).encode()
        ).hexdigest()
        self.loaded: list[str] = []
        self.solved: list[str] = []
        #: wall time spent fingerprinting, reading and writing progress (the feature's own cost)
        self.seconds = 0.0
        #: per decoder layer: its targets in model order (the first one's inputs are digested)
        self._layer_targets: dict[str, dict[nn.Linear, str]] = {}
        for module, name in (names or {}).items():
            layer = decoder_layer_name(name)
            if layer is not None:
                self._layer_targets.setdefault(layer, {})[module] = name
        self._layer_of = {m: layer for layer, ms in self._layer_targets.items() for m in ms}
        #: the decoder layers holding targets, model order
        self.layer_names = list(self._layer_targets)
        self._units: dict[str, _Unit] = {}
        self._done: set[str] = set()
        #: whether the last unit processed was loaded (the chain that lets a layer skip statistics)
        self._previous_loaded = False
        #: each unit's stored checksum, once written or read here
        self.checksums: dict[str, str] = {}
        #: layers fast-forwarded (no calibration pass), and their dense weights' digest (checked)
        self._skipped: dict[str, str] = {}
        self.fast_forward: FastForward | None = None

    def open(self) -> LayerProgress:
        """Check ``run.json`` against this run (refuse on any difference) or write it."""
        path = self.folder / RUN_FILE
        if path.exists():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise ARMORValueError(
                    f"progress folder {self.folder}: {RUN_FILE} is unreadable ({err}); delete the "
                    "folder or pass another progress_dir"
                ) from err
            mine = json.loads(json.dumps(self.run_info))
            differ = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            if differ:
                detail = "; ".join(_difference(k, stored.get(k), mine.get(k)) for k in differ)
                raise ARMORValueError(
                    f"progress folder {self.folder} belongs to another run ({detail}); pass a new "
                    "progress_dir or delete that folder to start afresh"
                )
            return self
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.run_info, indent=1, sort_keys=True)
            replace_file(path, lambda temporary: temporary.write_text(text))
        return self

    def wants_statistics(self, module: nn.Linear, x: torch.Tensor) -> bool:
        """Forward-hook body, before the statistics: digest ``x`` when ``module`` is its decoder
        layer's first target; ``False`` when that layer will be loaded without statistics.

        A layer skips its statistics when the unit before it was loaded (so it was fed exactly
        the inputs the stored run saw, up to the checks below) and its file passes every check
        but the inputs: format, checksum, run and dense weights. Its inputs' digest is then
        compared when the layer ends; the first unit of a run always collects statistics, so a
        different calibration set is recomputed, not refused."""
        layer = self._layer_of.get(module)
        if layer is None or layer in self._done:
            return True
        first = module is next(iter(self._layer_targets[layer]))
        unit = self._units.get(layer)
        if unit is None:  # only the first target's inputs can vouch for a layer without statistics
            unit = self._units[layer] = self._open_unit(layer) if first else _Unit()
        if first:
            start = time.perf_counter()
            unit.inputs.add(x)
            self.seconds += time.perf_counter() - start
        return not unit.skips_statistics

    def fingerprint(
        self, key: str, modules: Mapping[nn.Linear, str],
        statistics: Mapping[nn.Linear, InputStatistics],
    ) -> dict[str, str]:  # fmt: skip
        """A unit's fingerprint (all ranks alike): SHA-256 of its dense targets' weights and,
        when collected, statistics, and the digest of its first target's inputs
        (:mod:`.digest`) when the unit is a decoder layer."""
        if key in self._skipped:  # no inputs, no statistics: the weights were checked at start
            self._done.add(key)
            return {"weights": self._skipped[key]}
        unit = self._units.pop(key, None)
        if unit is None and key in self._layer_targets:  # this rank got no calibration batch
            unit = self._open_unit(key)
        self._done.add(key)
        stats: list[torch.Tensor] = []
        for module in modules:
            if module in statistics:  # what the solver reads: float32, the same in any order
                stat = statistics[module]
                hessian = stat.hessian()
                stats.extend([stat.mean(), stat.count] + ([] if hessian is None else [hessian]))
        # taken again here, not at the skip decision: a modifier before ARMOR in the same
        # sequential pass (SmoothQuant, AWQ) may change the weights at the end of the epoch
        mine = {"weights": _weights_digest(modules)}
        if not (unit and unit.skips_statistics):
            mine["statistics"] = _digest(stats)
        if unit is not None:
            mine["inputs"] = unit.inputs.hexdigest()
        if not is_distributed():
            return mine
        every = all_gather_objects(mine)
        if len({tuple(sorted(f)) for f in every}) > 1:
            raise ARMORValueError(
                f"ARMOR progress {key}: the ranks disagree on loading it without statistics "
                f"({[sorted(f) for f in every]}); rerun with the same progress folder visible "
                "to every rank"
            )
        joined = {part: hashlib.sha256(json.dumps([f[part] for f in every]).encode()).hexdigest()
                  for part in mine if part != "weights"}  # fmt: skip
        return {"weights": every[0]["weights"], **joined}

    def verify(self, key: str, expect: Mapping[str, str]) -> tuple[str | None, str | None]:
        """Whether decoder layer ``key``'s file would load now on its weights alone, with
        ``expect``'s metadata (``checksum``, ``frontier``): ``(digest of its dense weights,
        None)``, or ``(None, why not)``."""
        modules = self._layer_targets[key]
        weights = _weights_digest(modules)
        _stored, why = self._read(key, {"weights": weights, **expect}, modules.values())
        return (weights, None) if why is None else (None, why)

    def skip_inputs(self, weights: Mapping[str, str]) -> None:
        """Load these layers on their checked ``weights`` digests alone (:mod:`.fast_forward`)."""
        self._skipped = dict(weights)

    def note(self, key: str, loaded: bool) -> None:
        """Record how unit ``key`` was done (loaded or solved here)."""
        (self.loaded if loaded else self.solved).append(key)
        self._previous_loaded = loaded

    def _open_unit(self, layer: str) -> _Unit:
        """A decoder layer's first calibration input: decide whether it skips statistics."""
        if not self._previous_loaded:
            return _Unit()
        start = time.perf_counter()
        modules = self._layer_targets[layer]
        weights = _weights_digest(modules)
        stored, _why = self._read(layer, {"weights": weights}, modules.values())
        self.seconds += time.perf_counter() - start
        return _Unit(skips_statistics=stored is not None)

    def load(
        self, key: str, fingerprint: Mapping[str, str], names: Collection[str]
    ) -> StoredLayer | None:
        """The stored unit when it holds exactly ``names`` and matches ``fingerprint`` on every
        rank, else ``None`` (the layer is then recomputed); refused when the unit has no
        statistics to recompute from."""
        stored, why = self._read(key, fingerprint, names)
        if is_distributed():
            whys = all_gather_objects(why)
            why = next((w for w in whys if w is not None), None)
        if why is not None and "statistics" not in fingerprint:
            raise ARMORValueError(
                f"ARMOR progress {key}: {why}, and this layer was calibrated without statistics "
                "because every layer before it was loaded (a different torch build, thread count "
                f"or device can change a layer's inputs); delete {self.folder / key}.safetensors "
                "and the layer files after it, or pass a new progress_dir"
            )
        if why is not None:
            if why != "missing":
                logger.warning(f"ARMOR progress {key}: {why}; recomputing this layer")
            return None
        return stored

    def save(
        self,
        key: str,
        fingerprint: Mapping[str, str],
        modules: Mapping[nn.Linear, str],
        results: Sequence[ARMORModuleResult],
        reconstructions: Sequence[LayerReconstruction],
    ) -> None:
        """Write the unit's factors (rank 0 only; atomic)."""
        if self.rank != 0:
            return
        tensors = {}
        for module, name in modules.items():
            tensors[f"{name}.A"] = getattr(module, ARMOR_A).detach().to("cpu").contiguous()
            tensors[f"{name}.B"] = getattr(module, ARMOR_B).detach().to("cpu").contiguous()
            tensors[f"{name}.core"] = module.weight.detach().to("cpu").contiguous()
        metadata = {
            "format": FORMAT,
            "run": self.run_digest,
            **fingerprint,
            "checksum": _digest([tensors[k] for k in sorted(tensors)]),
            "frontier": self.fast_forward.frontier_of(key) if self.fast_forward else "",
            "results": json.dumps([asdict(r) for r in results]),
            "reconstructions": json.dumps(
                [{"layer": r.layer, "num_windows": r.num_windows, "result": asdict(r.result)}
                 for r in reconstructions]
            ),  # fmt: skip
        }
        replace_file(
            self.folder / f"{key}.safetensors",
            lambda temporary: save_file(tensors, str(temporary), metadata=metadata),
        )
        self.checksums[key] = metadata["checksum"]

    def finish(self) -> str:
        """Give skipped layers their forwards back; the summary line."""
        skipped = 0
        if self.fast_forward is not None:
            skipped = len(self.fast_forward.skipped)
            self.fast_forward.release()
        return (
            f"ARMOR progress ({self.folder}): {len(self.loaded)} layers loaded ({skipped} "
            f"fast-forwarded), {len(self.solved)} solved, {self.seconds:.2f} s fingerprinting, "
            "reading and writing"
        )

    def _read(
        self, key: str, fingerprint: Mapping[str, str], names: Collection[str]
    ) -> tuple[StoredLayer | None, str | None]:
        path = self.folder / f"{key}.safetensors"
        if not path.exists():
            return None, "missing"
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except Exception as err:  # safetensors raises its own error types on a damaged file
            return None, f"the file is unreadable ({type(err).__name__}: {err})"
        if metadata.get("format") != FORMAT:
            return None, f"format {metadata.get('format')!r} is not {FORMAT!r}"
        if metadata.get("checksum") != _digest([tensors[k] for k in sorted(tensors)]):
            return None, "the stored tensors fail their checksum (corrupted)"
        if metadata.get("run") != self.run_digest:
            return None, "it was written by another run (recipe, version, targets or ranks differ)"
        for part, value in fingerprint.items():
            if metadata.get(part) != value:
                return None, f"its {_PARTS[part]} differ from this run's"
        stored = {k.rsplit(".", 1)[0] for k in tensors}
        if stored != set(names):
            return None, f"it holds {sorted(stored)}, not this layer's {sorted(names)}"
        factors: dict[str, tuple[torch.Tensor, ...]] = {}
        for name in stored:
            factors[name] = (tensors[f"{name}.A"], tensors[f"{name}.B"], tensors[f"{name}.core"])
        self.checksums[key] = metadata["checksum"]
        results = [_module_result(r) for r in json.loads(metadata["results"])]
        layers = [
            LayerReconstruction(r["layer"], _reconstruction_result(r["result"]), r["num_windows"])
            for r in json.loads(metadata["reconstructions"])
        ]
        return (factors, results, layers), None


def _module_result(fields: dict) -> ARMORModuleResult:
    return ARMORModuleResult(**{**fields, "shape": tuple(fields["shape"])})


def _reconstruction_result(fields: dict) -> ReconstructionResult:
    history = tuple(tuple(step) for step in fields["history"])
    return ReconstructionResult(**{**fields, "history": history})


def _difference(key: str, stored: Any, mine: Any) -> str:
    if isinstance(stored, dict) and isinstance(mine, dict):
        keys = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        return ", ".join(f"{key}.{k}: {stored.get(k)!r} there, {mine.get(k)!r} here" for k in keys)
    return f"{key}: {stored!r} there, {mine!r} here"


def process_unit(
    progress: LayerProgress,
    modules: list[nn.Linear],
    compressor: LinearCompressor,
    reconstruction: Reconstruction | None,
) -> None:
    """Compress one unit (a subgraph's pending targets), or load it when its progress matches;
    a unit solved here is then written to the progress folder."""
    if not modules:
        return
    names = {module: compressor.names[module] for module in modules}
    key = layer_key(list(names.values()))
    start = time.perf_counter()
    fingerprint = progress.fingerprint(key, names, compressor.statistics)
    stored = progress.load(key, fingerprint, names.values())
    if progress.fast_forward is not None:  # after a refusal to load, nothing is written
        progress.fast_forward.before_unit(key)
    progress.seconds += time.perf_counter() - start
    if stored is not None:
        factors, results, layers = stored
        by_name = {result.name: result for result in results}

        def restore() -> None:
            for module, name in names.items():
                compressor.restore(module, factors[name], by_name[name])

        if reconstruction is None:
            restore()
        else:
            reconstruction.skip(modules, restore)
            reconstruction.reconstructions.extend(layers)
        progress.note(key, loaded=True)
        return
    done_before = len(reconstruction.reconstructions) if reconstruction else 0
    if reconstruction is None:
        compressor.compress(modules)
    else:
        reconstruction.process(modules)
    layers = reconstruction.reconstructions[done_before:] if reconstruction else []
    start = time.perf_counter()
    progress.save(key, fingerprint, names, [compressor.results[n] for n in names.values()], layers)
    progress.note(key, loaded=False)
    progress.seconds += time.perf_counter() - start
