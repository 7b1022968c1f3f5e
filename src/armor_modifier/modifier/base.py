"""``ARMORModifier``: ARMOR 2:4 pruning as an llm-compressor 0.14 modifier.

The adapter between llm-compressor's lifecycle, the pure-torch solver
(:func:`armor_modifier.core.factorize`, configured by one :class:`SolverSettings`) and the
runtime (:func:`armor_modifier.runtime.attach_wrappers`).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from compressed_tensors.offload import get_execution_device
from compressed_tensors.utils import (
    align_module_device,
    match_named_modules,
    update_offload_parameter,
)
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.factory import ModifierFactory
from loguru import logger
from pydantic import Field, PrivateAttr, model_validator
from torch import nn
from tqdm import tqdm

from armor_modifier.core import ARMORFactors, SolverSettings, factorize
from armor_modifier.core.errors import ARMORCompressionError, ARMORValueError
from armor_modifier.core.problem import block_within_budget
from armor_modifier.core.reconstruct import RECONSTRUCTION_HELP, RefinementSettings
from armor_modifier.format.hooks import install_save_hook
from armor_modifier.format.save import ARMOR_RECIPE_ATTR
from armor_modifier.runtime import attach_wrappers, is_armor_linear

from .checks import (
    check_calibration_set,
    check_recipe_composition,
    check_shared_calibration_pass,
    check_target_linears,
    resolve_target_linears,
)
from .parallel import SOLVER_ERRORS, compress_distributed, is_distributed, rank_and_world
from .reconstruction import Reconstruction, summarize_refinements
from .report import ARMORModuleResult, summarize
from .stats import InputStatistics, collect_dense_statistics

__all__ = ["ARMORModifier", "register"]

_DEFAULTS = SolverSettings()
_REFINE = RefinementSettings()
#: The modifier's fields that configure the solver (all of :class:`SolverSettings`).
SOLVER_FIELDS = tuple(f.name for f in dataclasses.fields(SolverSettings))


class ARMORModifier(Modifier):
    """ARMOR 2:4 pruning: each Linear ``W`` becomes ``A · S · B``, a 2:4 sparse core ``S`` between
    small block-diagonal wrappers ``A``, ``B``.

    Paper: L. Liu et al., *ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix
    Factorization*, https://arxiv.org/abs/2510.05528 (independent Apache-2.0 implementation).
    After compression each Linear's ``weight`` holds the exactly-2:4 core and forward hooks apply
    ``B`` before and ``A`` after it, so the in-memory model computes ``y = A (S (B x)) + bias``.
    Measured effects of every knob: ``docs/benchmark_smollm2.md``.

    Sample yaml (``import armor_modifier.modifier`` first, so the recipe can name the class)::

        armor_stage:
          pruning_modifiers:
            ARMORModifier:
              targets: ["Linear"]
              ignore: ["re:.*lm_head"]
              max_wrapper_overhead: 0.1
              num_iterations: 20

    Lifecycle:

    - on_initialize: resolve ``targets``/``ignore`` to Linears and check them and the recipe
      (errors for non-Linear targets, shapes not divisible by 4, tied weights, non-finite
      weights, quantized modules, GPTQ / AWQ / SmoothQuant / rotations / pruning after ARMOR)
    - on_calibration_start: ``calibration="dense"`` runs the unpruned model once for the
      statistics; ``"sequential"`` hooks the targets
    - on_sequential_epoch_end (once per decoder layer): factorize that layer's Linears, write the
      2:4 cores, attach the wrappers (under torchrun the work is spread over ranks)
    - on_calibration_end: compress what is left, remove hooks, log the summary
    - on_finalize: error if a target was left; install the armor-ct ``save_pretrained`` hook

    Quantize after ARMOR with ``QuantizationModifier`` (round-to-nearest FP8_DYNAMIC, W8A8 or
    W4A16); GPTQ after ARMOR is refused (llm-compressor 0.14's GPTQ fills pruned zeros).

    :param targets: llm-compressor target names: class names, exact names or ``re:`` patterns
        (default ``["Linear"]``)
    :param ignore: modules left dense; use ``"re:.*lm_head"`` for the head
    :param mask_structure: ``"2:4"`` only
    :param calibration: ``"sequential"`` (each layer sees the already-pruned earlier layers'
        outputs) or ``"dense"`` (one extra pass of the unpruned model); default by objective:
        sequential for ``"output"``, dense for ``"proxy"``
    :param max_wrapper_overhead: see :data:`armor_modifier.core.FIELD_HELP` (all solver fields
        below are documented there and in :class:`~armor_modifier.core.SolverSettings`)
    :param wrapper_block_size: ``None`` follows ``max_wrapper_overhead``; a value wins
    :param num_iterations: block-coordinate-descent iterations per Linear
    :param update_mode: ``"exact"`` or ``"adam"``
    :param learning_rate: Adam learning rate
    :param cg_steps: conjugate-gradient steps on the core per iteration
    :param update_mask: run the discrete 2:4 step
    :param groups_per_tile: groups re-optimised per tile (proxy objective)
    :param patience: iterations without improvement before a Linear stops
    :param seed: base seed; each Linear adds ``crc32(name)``
    :param objective: ``"output"`` or ``"proxy"``
    :param init: ``"sparsegpt"``, ``"nowag"`` or ``None`` (by objective)
    :param dampening_frac: SparseGPT's Hessian damping
    :param output_damping: ridge on the output objective's Hessian
    :param output_damping_kind: ``"identity"`` or ``"diagonal"``
    :param propagate_within_layer: compress each decoder layer's Linears in call order, groups
        sharing one input (q/k/v, o, gate/up, down), each later group's statistics re-collected
        through the already compressed ones (sequential calibration only)
    :param reconstruction_steps: Adam steps refining each decoder layer's ARMOR parameters
        jointly on the layer's output error (``0``: off, the per-Linear result bit for bit)
    :param reconstruction_learning_rate: Adam learning rate of the refinement
    :param reconstruction_windows_per_step: calibration windows (batches) per Adam step
    :param reconstruction_parameters: what moves: ``"all"`` (``A``, ``B`` and the kept core
        values), ``"wrappers"`` or ``"core"`` (the masks never move: cores stay exactly 2:4)
    :param reconstruction_guard_fraction: share of the calibration windows held out; the
        iterate with the lowest held-out error is kept, and only if it beats the start
    :param reconstruction_eval_every: steps between held-out evaluations
    :param reconstruction_target: ``"layer"`` (the dense layer's output on the same, already
        compressed upstream inputs; the default) or ``"model"`` (the dense model's hidden
        state: also corrects upstream drift, which on SmolLM2 fitted the calibration text's
        domain and lost out of it: docs/benchmark_reconstruction_notes.md)

    Measured effects of the reconstruction fields: ``docs/benchmark_reconstruction.md``.
    """

    requires_calibration_data: bool = True

    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    mask_structure: Literal["2:4"] = "2:4"
    calibration: Literal["sequential", "dense"] | None = None

    max_wrapper_overhead: float = _DEFAULTS.max_wrapper_overhead
    wrapper_block_size: int | None = _DEFAULTS.wrapper_block_size
    num_iterations: int = _DEFAULTS.num_iterations
    update_mode: Literal["exact", "adam"] = _DEFAULTS.update_mode
    learning_rate: float = _DEFAULTS.learning_rate
    cg_steps: int = _DEFAULTS.cg_steps
    update_mask: bool = _DEFAULTS.update_mask
    groups_per_tile: int = _DEFAULTS.groups_per_tile
    patience: int = _DEFAULTS.patience
    seed: int = _DEFAULTS.seed
    objective: Literal["proxy", "output"] = _DEFAULTS.objective
    init: Literal["nowag", "sparsegpt"] | None = _DEFAULTS.init
    dampening_frac: float = _DEFAULTS.dampening_frac
    output_damping: float = _DEFAULTS.output_damping
    output_damping_kind: Literal["identity", "diagonal"] = _DEFAULTS.output_damping_kind

    propagate_within_layer: bool = False
    reconstruction_steps: int = _REFINE.steps
    reconstruction_learning_rate: float = _REFINE.learning_rate
    reconstruction_windows_per_step: int = _REFINE.windows_per_step
    reconstruction_parameters: Literal["all", "wrappers", "core"] = "all"
    reconstruction_guard_fraction: float = _REFINE.guard_fraction
    reconstruction_eval_every: int = _REFINE.eval_every
    reconstruction_target: Literal["layer", "model"] = "layer"

    _modules: dict[str, nn.Linear] = PrivateAttr(default_factory=dict)
    _names: dict[nn.Linear, str] = PrivateAttr(default_factory=dict)
    _stats: dict[nn.Linear, InputStatistics] = PrivateAttr(default_factory=dict)
    _compressed: list[str] = PrivateAttr(default_factory=list)
    _results: dict[str, ARMORModuleResult] = PrivateAttr(default_factory=dict)
    _progress: Any = PrivateAttr(default=None)
    _budget_block: int | None = PrivateAttr(default=None)
    _reconstruction: Reconstruction | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_solver_settings(self) -> ARMORModifier:
        self.solver_settings  # noqa: B018  (SolverSettings checks every field on creation)
        self.refinement_settings  # noqa: B018  (RefinementSettings checks its fields too)
        if self.works_per_layer and self.effective_calibration != "sequential":
            raise ARMORValueError(
                f"propagate_within_layer={self.propagate_within_layer} / reconstruction_steps="
                f"{self.reconstruction_steps} replay decoder layers on the sequential pipeline's "
                f"inputs, but calibration is {self.effective_calibration!r}; set "
                "calibration='sequential' (objective='output' defaults to it)"
            )
        return self

    @property
    def works_per_layer(self) -> bool:
        """Whether within-layer propagation or reconstruction is on."""
        return self.propagate_within_layer or self.reconstruction_steps > 0

    @property
    def refinement_settings(self) -> RefinementSettings:
        """The ``reconstruction_*`` fields as one checked :class:`RefinementSettings`."""
        return RefinementSettings.from_fields(self._layer_fields(), seed=self.seed)

    def _layer_fields(self) -> dict[str, Any]:
        """The decoder-layer fields (``propagate_within_layer``, ``reconstruction_*``)."""
        return {name: getattr(self, name) for name in RECONSTRUCTION_HELP}

    @property
    def target_modules(self) -> dict[str, nn.Linear]:
        """``{name: Linear}`` of every target, model order (known after initialisation)."""
        return dict(self._modules)

    @property
    def refinements(self) -> list:
        """Per decoder layer, what reconstruction did
        (:class:`~armor_modifier.modifier.reconstruction.LayerRefinement`), kept after oneshot."""
        return list(self._reconstruction.refinements) if self._reconstruction else []

    @property
    def solver_settings(self) -> SolverSettings:
        """The solver fields as one checked :class:`SolverSettings`; once the targets are known
        and ``wrapper_block_size`` is unset, with the block size the overhead budget gives them
        (:attr:`budget_block_size`)."""
        settings = SolverSettings(**{name: getattr(self, name) for name in SOLVER_FIELDS})
        if self._budget_block is not None and self.wrapper_block_size is None:
            settings = settings.replace(wrapper_block_size=self._budget_block)
        return settings

    @property
    def budget_block_size(self) -> int | None:
        """With ``wrapper_block_size`` unset: the largest block size ``b`` whose wrappers, over all
        of this modifier's targets together (each Linear gets the largest multiple of 4 ``<= b``
        dividing it), stay within ``max_wrapper_overhead`` of their weights; set at
        initialisation (SmolLM2-135M at 0.10: 44, i.e. 36 for q/o and 32 elsewhere, 9.5 %)."""
        return self._budget_block

    @property
    def effective_calibration(self) -> str:
        """``calibration``, or its default for the objective when it is ``None``."""
        if self.calibration is not None:
            return self.calibration
        return "sequential" if self.objective == "output" else "dense"

    @property
    def results(self) -> dict[str, ARMORModuleResult]:
        """Per-module results (name -> :class:`ARMORModuleResult`), kept after ``oneshot``."""
        return dict(self._results)

    @property
    def compressed_modules(self) -> list[str]:
        """Names of the modules pruned and wrapped so far, in order."""
        return list(self._compressed)

    @property
    def statistics(self) -> dict[nn.Linear, InputStatistics]:
        """The input statistics collected so far, per target Linear (shared with the ranks)."""
        return self._stats

    def settings(self) -> dict[str, Any]:
        """What an armor-ct checkpoint records in ``armor.recipe`` (JSON-able)."""
        return {
            "modifier": type(self).__name__,
            "targets": self.targets,
            "ignore": list(self.ignore),
            "mask_structure": self.mask_structure,
            "calibration": self.effective_calibration,
            **self.solver_settings.to_dict(),
            "wrapper_block_size": self.wrapper_block_size,
            "budget_block_size": self._budget_block,
            **self._layer_fields(),
        }

    # ---- lifecycle -------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Resolve and check the target Linears and the rest of the recipe; no data yet."""
        model = state.model
        layers = dict(match_named_modules(model, self.targets))
        if not layers:
            raise ARMORValueError(
                f"targets={self.targets!r} match no module of {type(model).__name__}; use "
                "'Linear', a class name, an exact module name or a 're:' pattern"
            )
        modules = resolve_target_linears(layers, self.ignore)
        if not modules:
            raise ARMORValueError(
                f"targets={self.targets!r} matched {list(layers)[:5]}... but, after ignore="
                f"{self.ignore!r}, no nn.Linear is left to prune"
            )
        check_target_linears(model, modules)
        check_calibration_set(state.data.calib)
        check_recipe_composition(self, active_session().lifecycle.recipe.modifiers)
        self._modules = modules
        self._names = {module: name for name, module in modules.items()}
        if self.wrapper_block_size is None:
            shapes = [(module.out_features, module.in_features) for module in modules.values()]
            self._budget_block = block_within_budget(shapes, self.max_wrapper_overhead)
        logger.info(
            f"ARMOR will prune {len(modules)} Linear modules (objective={self.objective}, "
            f"calibration={self.effective_calibration}, "
            f"{_block_description(self)}, num_iterations={self.num_iterations})"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """Sequential: hook the targets. Dense: run the unpruned model once and keep the sums."""
        check_shared_calibration_pass(
            self, active_session().lifecycle.recipe.modifiers, self._modules
        )
        if self.effective_calibration == "dense":
            if state.data.calib is None:
                raise ARMORValueError(
                    "ARMORModifier(calibration='dense') needs calibration data: pass `dataset=` "
                    "to oneshot"
                )
            collect_dense_statistics(
                self,
                state.model,
                state.data.calib,
                self._names,
                self._stats,
                lambda stat: lambda _module, args, _output: stat.add(args[0]),
                with_gram=self.solver_settings.needs_hessian,
            )
            return
        hook: Callable[..., None] = self.calibrate_module
        for module in self._names:
            self.register_hook(module, hook, "forward")
        if self.works_per_layer:
            self._check_guard_windows(state.data.calib)
            self._reconstruction = Reconstruction(self, state.model)
            self._reconstruction.register_hooks()

    def calibrate_module(
        self, module: nn.Linear, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ) -> None:
        """Forward hook: add the input's ``x^2`` per channel (and ``X^T X`` when needed; float64
        sums, :mod:`.stats`) and its token count."""
        if is_armor_linear(module):
            return
        if module not in self._stats:
            self._stats[module] = self.empty_statistics(module)
        self._stats[module].add(args[0])

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module] | None = None, **kwargs: Any
    ) -> None:
        """Compress this subgraph's targets (the next subgraph then sees the pruned layers)."""
        in_subgraph = {id(module) for module in modules or []}
        pending = [m for m in self._pending() if id(m) in in_subgraph]
        if self._reconstruction is not None:
            self._reconstruction.process(pending)
        else:
            self.compress_modules(pending)

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        """Compress what is left, remove the hooks and log the summary."""
        self.remove_hooks()
        self.compress_modules(self._pending())
        self._close_progress()
        logger.info(summarize(self._results.values()))
        if self._reconstruction is not None:
            self._reconstruction.release()
            if self.reconstruction_steps > 0:
                logger.info(summarize_refinements(self._reconstruction.refinements))

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        """Check that every target was compressed; route ``save_pretrained`` to armor-ct."""
        self.remove_hooks()
        self._close_progress()
        left = [self._names[m] for m in self._pending()]
        self._stats = {}
        if left:
            raise ARMORValueError(
                f"ARMOR did not compress {len(left)} target modules: {left}; calibration never "
                "reached them (did oneshot get a dataset?)"
            )
        # after oneshot wrapped save_pretrained: the armor-ct hook must sit outside that wrapper
        install_save_hook(state.model, recipe=_recorded(state.model, self.settings()))
        return True

    # ---- compression -----------------------------------------------------------------------

    def compress_modules(self, modules: list[nn.Linear] | None = None) -> None:
        """Factorize, write back and wrap ``modules`` (default: every calibrated, uncompressed
        target), in model order. Under torch.distributed the work is shared across ranks."""
        if modules is None:
            modules = [m for m in self._pending() if m in self._stats]
        if not modules:
            return
        try:
            if is_distributed():
                compress_distributed(self, modules)
                return
            self.require_tokens(modules)
            for module in modules:
                try:
                    factors = self.solve(module)
                except SOLVER_ERRORS as err:
                    raise ARMORCompressionError(
                        self.name_of(module), self._compressed, repr(err)
                    ) from err
                self.apply(module, factors.A, factors.B, factors.core)
                self.record(self.result(module, factors))
                del self._stats[module]
        except BaseException:
            self._close_progress()
            raise

    def solve(self, module: nn.Linear) -> ARMORFactors:
        """Run the solver on one target from its statistics (the module is not changed)."""
        name = self.name_of(module)
        if is_armor_linear(module):
            raise ARMORValueError(
                "it already carries ARMOR wrappers (two ARMORModifiers target it); give each "
                "ARMORModifier disjoint targets"
            )
        stats = self._stats[module]
        settings = self.solver_settings.replace(
            seed=(self.seed + zlib.crc32(name.encode())) % 2**63
        )
        with torch.no_grad(), align_module_device(module):
            return factorize(module.weight, stats.mean(), settings, H=stats.hessian())

    def apply(
        self, module: nn.Linear, A: torch.Tensor, B: torch.Tensor, core: torch.Tensor
    ) -> None:
        """Write the core into ``weight`` (model dtype) and hook ``A``, ``B`` into the forward."""
        with torch.no_grad():
            update_offload_parameter(module, "weight", core.to(module.weight.dtype))
            with align_module_device(module):
                attach_wrappers(module, A, B)

    def result(self, module: nn.Linear, factors: ARMORFactors, rank: int = 0) -> ARMORModuleResult:
        """The report of one solved module."""
        return ARMORModuleResult.from_factors(
            self.name_of(module),
            factors,
            self.solver_settings.wrapper_block_size or factors.wrapper_block_size,
            self._stats[module].num_tokens,
            rank=rank,
            from_budget=self.wrapper_block_size is None,
        )

    def record(self, result: ARMORModuleResult, log: bool = True) -> None:
        """Keep ``result``, log its line and advance the progress bar."""
        self._results[result.name] = result
        self._compressed.append(result.name)
        if log:
            logger.info(result.log_line())
        if self._progress is None:
            self._progress = tqdm(total=len(self._modules), desc="ARMOR", unit="module")
        self._progress.update(1)

    def name_of(self, module: nn.Linear) -> str:
        """The model's name for a target module."""
        return self._names[module]

    def require_tokens(self, modules: Sequence[nn.Linear]) -> None:
        """Raise naming the modules that received no calibration tokens."""
        empty = [
            self._names[m]
            for m in modules
            if m not in self._stats or self._stats[m].num_tokens == 0
        ]
        if empty:
            raise ARMORValueError(
                f"ARMOR received no calibration tokens for {len(empty)} modules: {empty}. The "
                "calibration set is empty or these modules never ran; pass a non-empty `dataset` "
                "to oneshot or add them to `ignore`."
            )

    def empty_statistics(self, module: nn.Linear) -> InputStatistics:
        """Zeroed statistics for ``module`` (with ``X^T X`` when the settings need ``H``)."""
        return InputStatistics.empty(
            module.in_features,
            get_execution_device(module),
            with_gram=self.solver_settings.needs_hessian,
        )

    def cost(self, module: nn.Linear) -> int:
        """Per-iteration cost ``~ m n b`` used to balance ranks."""
        m, n = module.weight.shape
        return m * n * self.solver_settings.block_size_for(m, n)

    def _check_guard_windows(self, calib: Any) -> None:
        """Refuse a calibration set too small to hold out a guard window (before any work)."""
        if self.reconstruction_steps == 0 or calib is None:
            return
        try:
            batches = len(calib) * rank_and_world()[1]
        except TypeError:
            return
        need = self.refinement_settings.min_windows()
        if batches < need:
            raise ARMORValueError(
                f"reconstruction_steps={self.reconstruction_steps} holds out "
                f"reconstruction_guard_fraction={self.reconstruction_guard_fraction:g} of the "
                f"calibration batches, but there are only {batches}: pass at least {need} "
                "calibration samples (batches), or raise the fraction"
            )

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _pending(self) -> list[nn.Linear]:
        done = set(self._compressed)
        return [m for name, m in self._modules.items() if name not in done]


def _recorded(model: nn.Module, mine: dict[str, Any]) -> dict[str, Any]:
    """``armor.recipe`` after this modifier: its settings, or, when an earlier ARMORModifier
    already recorded its own on the model, ``{"modifiers": [earlier..., mine]}``."""
    earlier = getattr(model, ARMOR_RECIPE_ATTR, None)
    if not isinstance(earlier, dict):
        return mine
    return {"modifiers": [*earlier.get("modifiers", [earlier]), mine]}


def _block_description(modifier: ARMORModifier) -> str:
    if modifier.wrapper_block_size is not None:
        return f"wrapper_block_size={modifier.wrapper_block_size}"
    return (
        f"max_wrapper_overhead={modifier.max_wrapper_overhead:g} -> wrapper_block_size="
        f"{modifier.budget_block_size}"
    )


def register() -> None:
    """Make ``ARMORModifier`` and ``ARMORGPTQModifier`` available to YAML recipes (idempotent)."""
    from .gptq import ARMORGPTQModifier

    for cls in (ARMORModifier, ARMORGPTQModifier):
        if ModifierFactory._registered_registry.get(cls.__name__) is not cls:
            ModifierFactory.register(cls.__name__, cls)
