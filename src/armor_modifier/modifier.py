"""``ARMORModifier``: ARMOR 2:4 pruning as an llm-compressor 0.14 modifier.

The adapter between llm-compressor's lifecycle, the pure-torch solver
(:func:`armor_modifier.core.factorize`) and the runtime
(:func:`armor_modifier.runtime.attach_wrappers`).
Helpers live in ``modifier_checks`` (targets, validation, recipe composition), ``modifier_stats``
(the ``x^2`` statistic, the dense pass), ``modifier_parallel`` (torch.distributed) and
``modifier_report`` (per-module results).
"""

from __future__ import annotations

import zlib
from typing import Any, Literal

import torch
from compressed_tensors.offload import get_execution_device
from compressed_tensors.utils import align_module_device, update_offload_parameter
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers.factory import ModifierFactory
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator
from torch import nn
from tqdm import tqdm

from .checkpoint import install_save_hook
from .core import ARMORFactors, choose_wrapper_block_size, factorize
from .modifier_checks import (
    check_recipe_composition,
    check_shared_calibration_pass,
    check_target_linears,
    resolve_target_linears,
)
from .modifier_parallel import (
    all_gather_objects,
    assign_owners,
    broadcast_tensors,
    is_distributed,
    rank_and_world,
    reduce_statistics,
)
from .modifier_report import ARMORModuleResult, summarize
from .modifier_stats import InputStatistics, collect_dense_statistics
from .runtime import attach_wrappers, is_armor_linear

__all__ = ["ARMORCompressionError", "ARMORModifier", "ARMORModuleResult", "register"]

_SOLVER_ERRORS = (RuntimeError, ValueError, TypeError)
_RECORDED_FIELDS = (
    "targets",
    "ignore",
    "mask_structure",
    "wrapper_block_size",
    "num_iterations",
    "update_mode",
    "learning_rate",
    "cg_steps",
    "update_mask",
    "patience",
    "seed",
    "calibration",
    "groups_per_tile",
    "objective",
    "init",
    "dampening_frac",
    "output_damping",
    "output_damping_kind",
)


class ARMORCompressionError(RuntimeError):
    """The solver failed on one module; earlier modules are already compressed.

    :ivar module_name: the module that failed
    :ivar compressed: names of the modules already pruned and wrapped, in order
    """

    def __init__(self, module_name: str, compressed: list[str], cause: str):
        self.module_name = module_name
        self.compressed = list(compressed)
        listed = ", ".join(compressed) if compressed else "none"
        super().__init__(
            f"ARMOR failed on module {module_name!r}: {cause}. Modules already compressed "
            f"(2:4 core + wrappers in memory) ({len(compressed)}): {listed}. The other modules "
            f"are unchanged; fix the cause or add {module_name!r} to `ignore` and rerun on the "
            "original model."
        )


class ARMORModifier(SparsityModifierBase):
    """ARMOR 2:4 pruning: each Linear ``W`` becomes ``A · S · B`` with a 2:4 sparse core ``S``
    and small block-diagonal wrappers ``A``, ``B``.

    Paper: L. Liu et al., *ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix
    Factorization*, https://arxiv.org/abs/2510.05528 (independent Apache-2.0 implementation).
    By default (``objective="output"``) block coordinate descent starts from SparseGPT's 2:4
    solution and lowers the layer's output error on the calibration inputs, never ending above
    SparseGPT's; with ``objective="proxy"`` it starts from NoWag-P and lowers the paper's proxy
    ``sum_ij h_j (A S B - W)_ij^2`` (``h_j`` = mean ``x_j^2`` over calibration tokens), never ending
    above NoWag-P's loss. After compression each Linear's ``weight`` holds the exactly-2:4 core
    and forward hooks apply ``B`` before and ``A`` after it, so the in-memory model (later layers,
    later modifiers, ``model.generate``) computes ``y = A (S (B x)) + bias`` at once.

    Sample yaml::

        armor_stage:
          pruning_modifiers:
            ARMORModifier:
              targets: ["Linear"]
              ignore: ["re:.*lm_head"]
              wrapper_block_size: 128
              num_iterations: 20
              objective: output
              output_damping: 0.1

    Python::

        import armor_modifier
        from armor_modifier.modifier import ARMORModifier
        oneshot(model=model, processor=tok, dataset=ds,
                recipe=[ARMORModifier(ignore=["re:.*lm_head"])])

    Lifecycle:

    - on_initialize
        - resolve ``targets``/``ignore`` to Linears (errors for non-Linear targets, shapes not
          divisible by 4, tied weights, already quantized modules, and for GPTQ / AWQ /
          SmoothQuant / AutoRound / rotations / other pruning later in the recipe)
    - on_calibration_start
        - ``calibration="dense"``: one forward pass of the unpruned model fills the ``x^2``
          sums (and ``X^T X`` when needed) of every target now
        - ``calibration="sequential"``: forward hooks accumulate them per Linear
    - on_sequential_epoch_end (once per subgraph; subgraphs are oneshot's ``sequential_targets``,
      by default the model's decoder layers)
        - factorize the subgraph's Linears, write the 2:4 core, attach the wrappers
          (under torchrun: all-reduce statistics, share the matrices, broadcast results)
    - on_calibration_end
        - compress any remaining Linear, remove hooks, log the summary
    - on_finalize
        - error if a target was left uncompressed; install the armor-ct ``save_pretrained`` hook
          (so ``oneshot(output_dir=...)`` and ``model.save_pretrained`` write armor-ct)

    Quantize after ARMOR with ``QuantizationModifier`` (round-to-nearest FP8_DYNAMIC, W8A8 or
    W4A16): it keeps the zeros exactly, and its observers see ``B x`` (the input hook runs first).
    GPTQ after ARMOR is refused: in llm-compressor 0.14 it fills pruned zeros.

    :param targets: modules whose prunable Linears are pruned: class names, exact names or
        ``re:`` patterns (llm-compressor vocabulary), e.g. ``"Linear"`` or
        ``"re:model.layers.\\d+$"``. Default ``["Linear"]``.
    :param ignore: modules to leave dense. ``"re:.*lm_head"`` and plain names both work; a plain
        name also matches as a dotted suffix (``"lm_head"`` protects ``model.lm_head``).
    :param mask_structure: ``"2:4"`` only (the only structure ARMOR produces).
    :param sparsity: fixed at 0.5 by the 2:4 structure; any other value is an error.
    :param wrapper_block_size: requested wrapper block size ``b`` (positive multiple of 4,
        default 128, as in the paper). Per matrix the largest multiple of 4 ``<= b`` dividing both
        dimensions is used and logged (SmolLM2's 576-wide layers get 96). Larger ``b``: lower
        loss, more time (cost ``~32 m n b`` per iteration) and more parameters (``(m+n) b``).
    :param num_iterations: maximum block-coordinate-descent iterations per matrix. Default 20:
        exact updates make most of their gain in the first tens of iterations (ARMOR_SPEC.md
        section 11: 20 iterations take a SmolLM2 MLP matrix from NoWag-P's 0.057 to 0.038 output
        error), and 20 keep SmolLM2-135M (210 matrices) at about 10 minutes of solving on 2 CPU
        cores (measured 590 s). Raise it (paper: 20,000 Adam steps) where time allows; 0 gives
        NoWag-P with identity wrappers.
    :param update_mode: ``"exact"`` (closed-form ``A``/``B`` and conjugate gradient on the core;
        monotone, the default) or ``"adam"`` (the paper's joint Adam step; needs many more
        iterations).
    :param learning_rate: Adam learning rate (``update_mode="adam"``), paper 1e-4.
    :param cg_steps: conjugate-gradient steps on the core per iteration (``"exact"``); more steps
        lower the loss per iteration at a proportional cost of that sub-step.
    :param update_mask: run the discrete 2:4 step (``False`` keeps NoWag-P's mask; faster).
    :param patience: stop a matrix after this many iterations without relative improvement
        of 1e-6.
    :param seed: base seed of the group sampling; each matrix gets ``seed + crc32(name)``, so
        results do not depend on the order or the rank that solves it.
    :param calibration: where the statistics come from; default ``None``: ``"sequential"`` for
        ``objective="output"``, ``"dense"`` for ``"proxy"``. ``"dense"``: the paper's, from
        one extra forward pass of the unpruned model over the calibration set at calibration start
        (other modifiers' hooks and quantization disabled). ``"sequential"``: llm-compressor's
        pipeline, each layer calibrated on the outputs of the already-compressed earlier layers.
        Dense won on SmolLM2-135M 2:4 (WikiVital test perplexity 30.54 vs 31.30 and 28.15 vs
        28.76 over two seeds, 20 iterations) for one forward pass more (~30 s there). The
        output objective with dense statistics and no damping broke SmolLM2 (perplexity 6.5e5
        although every layer's calibration error was below SparseGPT's): its wrappers fit the
        dense inputs and amplify the pruned model's deviations; sequential statistics see them.
    :param groups_per_tile: 4-groups re-optimised per ``b x b`` tile in each discrete step
        (``objective="proxy"``; the paper: 1). Each is an exact non-increasing sub-step; 64 (the
        default) reaches in tens of iterations what one group per tile needs thousands for.
    :param objective: ``"output"`` (the default; beyond the paper, ARMOR_SPEC.md section 11:
        the layer's relative output error ``tr(E H E^T) / tr(W H W^T)`` with the full Hessian
        ``H = X^T X / N``, from SparseGPT's solution) or ``"proxy"`` (the paper's
        ``diag(h)``-weighted loss from NoWag-P). Measured on SmolLM2-135M 2:4, block 32 (9.2 %
        wrappers): WikiVital-test perplexity 35.44 for output (10 iterations, sequential,
        damping 0.1, 272 s) vs 40.81 for proxy (20 iterations, dense statistics, 876 s);
        SparseGPT 54.06, dense 14.17 (docs/benchmark_smollm2.md).
    :param init: starting point: ``"nowag"`` (NoWag-P) or ``"sparsegpt"`` (SparseGPT 2:4 with
        ``H``, then the result is never worse than SparseGPT on its own objective). Default
        ``None``: NoWag-P for ``"proxy"``, SparseGPT for ``"output"``. ``"output"`` and
        ``"sparsegpt"`` collect ``H`` (``in_features^2`` floats per target; with
        ``calibration="dense"`` for every target at once).
    :param dampening_frac: SparseGPT's damping of ``H``, a fraction of ``mean(diag H)``
        (llm-compressor's name and default, 0.01).
    :param output_damping: ``objective="output"``: ridge ``output_damping * mean(diag H)`` added
        to ``H``, pulling ``W_hat`` towards ``W`` (0 keeps the exact calibration output error).
        Default 0.1: it cut held-out layer error by 7-24 % (benchmarks/output_layer_check.py).
    :param output_damping_kind: ``"identity"`` (the ridge above) or ``"diagonal"``
        (``output_damping * diag(H)``: a blend with the paper's per-channel proxy).
    """

    # fixed by the 2:4 structure (the base class requires them)
    sparsity: float | list[float] | None = 0.5
    mask_structure: str = "2:4"

    wrapper_block_size: int = 128
    num_iterations: int = Field(default=20, ge=0)
    update_mode: Literal["exact", "adam"] = "exact"
    learning_rate: float = Field(default=1e-4, gt=0)
    cg_steps: int = Field(default=2, ge=1)
    update_mask: bool = True
    patience: int = Field(default=100, ge=1)
    seed: int = Field(default=0, ge=0)
    calibration: Literal["sequential", "dense"] | None = None
    groups_per_tile: int = Field(default=64, ge=1)
    objective: Literal["proxy", "output"] = "output"
    init: Literal["nowag", "sparsegpt"] | None = None
    dampening_frac: float = Field(default=0.01, gt=0)
    output_damping: float = Field(default=0.1, ge=0)
    output_damping_kind: Literal["identity", "diagonal"] = "identity"

    _modules: dict[str, nn.Linear] = PrivateAttr(default_factory=dict)
    _stats: dict[nn.Module, InputStatistics] = PrivateAttr(default_factory=dict)
    _compressed: list[str] = PrivateAttr(default_factory=list)
    _results: dict[str, ARMORModuleResult] = PrivateAttr(default_factory=dict)
    _progress: Any = PrivateAttr(default=None)

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _only_2of4(cls, value: Any) -> str:
        if value != "2:4":
            raise ValueError(
                f"ARMORModifier produces 2:4 sparsity only, got mask_structure={value!r}; use "
                "'2:4' or, for other N:M patterns, SparseGPTModifier"
            )
        return value

    @field_validator("sparsity", mode="before")
    @classmethod
    def _only_half(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != 0.5:
            raise ValueError(
                f"ARMORModifier's sparsity is fixed at 0.5 by the 2:4 structure, got "
                f"sparsity={value!r}; drop the field"
            )
        return 0.5

    @field_validator("wrapper_block_size", mode="before")
    @classmethod
    def _block_size(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 4 or value % 4:
            raise ValueError(
                f"wrapper_block_size must be a positive multiple of 4 (2:4 groups must not "
                f"straddle wrapper blocks), got {value!r}; try 128 or 64"
            )
        return value

    @model_validator(mode="after")
    def _no_owl(self) -> ARMORModifier:
        owl = (self.sparsity_profile, self.owl_m, self.owl_lmbda)
        if any(value is not None for value in owl):
            raise ValueError(
                "ARMORModifier is uniformly 2:4; OWL layer-wise sparsity "
                "(sparsity_profile, owl_m, owl_lmbda) does not apply. Remove those fields."
            )
        return self

    @property
    def results(self) -> dict[str, ARMORModuleResult]:
        """Per-module results (name -> :class:`ARMORModuleResult`), kept after ``oneshot``."""
        return dict(self._results)

    @property
    def compressed_modules(self) -> list[str]:
        """Names of the modules pruned and wrapped so far, in order."""
        return list(self._compressed)

    # ---- lifecycle -------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs) -> bool:
        """Resolve and validate the target Linears and the rest of the recipe; no data yet."""
        super().on_initialize(state, **kwargs)
        model = state.model
        if not self._target_layers:
            raise ValueError(
                f"targets={self.targets!r} match no module of {type(model).__name__}; use "
                "'Linear', a class name, an exact module name or a 're:' pattern"
            )
        modules = resolve_target_linears(self._target_layers, self.ignore)
        if not modules:
            matched = list(self._target_layers)[:5]
            raise ValueError(
                f"targets={self.targets!r} matched {matched}... but, after ignore="
                f"{self.ignore!r}, no nn.Linear is left to prune"
            )
        check_target_linears(model, modules)
        calib = state.data.calib
        if calib is not None and hasattr(calib, "__len__") and len(calib) == 0:
            raise ValueError(
                "the calibration set is empty; ARMOR needs calibration tokens for every target "
                "(pass a non-empty `dataset` to oneshot)"
            )
        check_recipe_composition(self, active_session().lifecycle.recipe.modifiers)
        self._modules = modules
        self._module_names = {module: name for name, module in modules.items()}
        logger.info(
            f"ARMOR will prune {len(modules)} Linear modules (objective={self.objective}, "
            f"calibration={self.effective_calibration}, "
            f"wrapper_block_size={self.wrapper_block_size}, num_iterations={self.num_iterations}, "
            f"update_mode={self.update_mode})"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        """Sequential: hook the targets. Dense: run the unpruned model once and keep ``h``."""
        check_shared_calibration_pass(
            self, active_session().lifecycle.recipe.modifiers, self._modules
        )
        if self.effective_calibration == "dense":
            if state.data.calib is None:
                raise ValueError(
                    "ARMORModifier(calibration='dense') needs calibration data: pass `dataset=` "
                    "to oneshot"
                )
            collect_dense_statistics(
                self,
                state.model,
                state.data.calib,
                self._module_names,
                self._stats,
                lambda stat: lambda _module, args, _output: stat.add(args[0]),
                with_gram=self.needs_hessian,
            )
            return
        for module in self._module_names:
            self.register_hook(module, self.calibrate_module, "forward")

    def calibrate_module(
        self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ):
        """Forward hook: add the input's ``x^2`` per channel (fp32) and its token count."""
        if is_armor_linear(module):
            return
        stat = self._stats.get(module)
        if stat is None:
            stat = self._empty_statistics(module)
            self._stats[module] = stat
        stat.add(args[0])

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module] | None = None, **kwargs
    ):
        """Compress this subgraph's targets (the next subgraph then sees the pruned layers)."""
        in_subgraph = {id(module) for module in modules or []}
        self.compress_modules([m for m in self._pending() if id(m) in in_subgraph])

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        """Compress what is left, remove the hooks and log the summary."""
        self.remove_hooks()
        self.compress_modules(self._pending())
        self._close_progress()
        logger.info(summarize(self._results.values()))

    def on_finalize(self, state: State, **kwargs) -> bool:
        """Check that every target was compressed; route ``save_pretrained`` to armor-ct."""
        self.remove_hooks()
        self._close_progress()
        left = [self._module_names[m] for m in self._pending()]
        self._stats = {}
        if left:
            raise ValueError(
                f"ARMOR did not compress {len(left)} target modules: {left}; calibration never "
                "reached them (did oneshot get a dataset?)"
            )
        # after oneshot wrapped save_pretrained: the armor-ct hook must sit outside that wrapper
        install_save_hook(state.model, recipe=self.settings())
        return True

    def settings(self) -> dict[str, Any]:
        """The ARMOR settings recorded in an armor-ct checkpoint (``armor.recipe``), JSON-able."""
        fields = self.model_dump(include=set(_RECORDED_FIELDS))
        return {"modifier": type(self).__name__, **{k: fields[k] for k in _RECORDED_FIELDS}}

    # ---- compression -----------------------------------------------------------------------

    def compress_modules(self, modules: list[nn.Module] | None = None):
        """Factorize, write back and wrap ``modules`` (default: every calibrated, uncompressed
        target), in model order. Under torch.distributed the work is shared across ranks."""
        if modules is None:
            modules = [m for m in self._pending() if m in self._stats]
        if not modules:
            return
        if is_distributed():
            self._compress_distributed(modules)
            return
        self._require_tokens(modules)
        for module in modules:
            name = self._module_names[module]
            try:
                factors = self._solve(module)
            except _SOLVER_ERRORS as err:
                self._close_progress()
                raise ARMORCompressionError(name, self._compressed, repr(err)) from err
            self._apply(module, factors.A, factors.B, factors.core)
            tokens = self._stats.pop(module).num_tokens
            self._record(
                ARMORModuleResult.from_factors(name, factors, self.wrapper_block_size, tokens)
            )

    def _compress_distributed(self, modules: list[nn.Module]) -> None:
        rank, world = rank_and_world()
        for module in modules:
            if module not in self._stats:
                self._stats[module] = self._empty_statistics(module)
        reduce_statistics([self._stats[m] for m in modules])
        self._require_tokens(modules)
        rank_to_modules, owner = assign_owners(modules, self._cost, world)

        solved: dict[nn.Module, ARMORFactors] = {}
        failure = None
        for module in rank_to_modules[rank]:
            try:
                solved[module] = self._solve(module)
            except _SOLVER_ERRORS as err:
                failure = (self._module_names[module], repr(err))
                break
        failures = [f for f in all_gather_objects(failure) if f is not None]
        if failures:
            name, cause = failures[0]
            self._close_progress()
            raise ARMORCompressionError(name, self._compressed, cause)

        local = {}
        for module in modules:
            name = self._module_names[module]
            A, B, core = self._receive_buffers(module, solved.get(module))
            broadcast_tensors([A, B, core], src=owner[module])
            self._apply(module, A, B, core)
            if module in solved:
                local[name] = ARMORModuleResult.from_factors(
                    name,
                    solved[module],
                    self.wrapper_block_size,
                    self._stats[module].num_tokens,
                    rank=rank,
                )
        gathered: dict[str, ARMORModuleResult] = {}
        for part in all_gather_objects(local):
            gathered.update(part)
        for module in modules:
            del self._stats[module]
            self._record(gathered[self._module_names[module]], log=owner[module] == rank)

    def _receive_buffers(
        self, module: nn.Linear, factors: ARMORFactors | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The owner's ``(A, B, core)`` fp32, or zero buffers of the same shapes to receive."""
        where = {"device": get_execution_device(module), "dtype": torch.float32}
        if factors is not None:
            return tuple(t.to(**where).contiguous() for t in (factors.A, factors.B, factors.core))
        m, n = module.weight.shape
        b = choose_wrapper_block_size(m, n, self.wrapper_block_size)
        return (
            torch.zeros(m // b, b, b, **where),
            torch.zeros(n // b, b, b, **where),
            torch.zeros(m, n, **where),
        )

    def _solve(self, module: nn.Linear) -> ARMORFactors:
        name = self._module_names[module]
        if is_armor_linear(module):
            raise ValueError(
                "it already carries ARMOR wrappers (two ARMORModifiers target it); give each "
                "ARMORModifier disjoint targets"
            )
        stats = self._stats[module]
        with torch.no_grad(), align_module_device(module):
            return factorize(
                module.weight,
                stats.mean(),
                wrapper_block_size=self.wrapper_block_size,
                num_iterations=self.num_iterations,
                mode=self.update_mode,
                lr=self.learning_rate,
                cg_steps=self.cg_steps,
                update_mask=self.update_mask,
                groups_per_tile=self.groups_per_tile,
                patience=self.patience,
                seed=(self.seed + zlib.crc32(name.encode())) % 2**63,
                objective=self.objective,
                H=stats.hessian(),
                init=self.init,
                percdamp=self.dampening_frac,
                output_damping=self.output_damping,
                output_damping_kind=self.output_damping_kind,
            )

    def _apply(
        self, module: nn.Linear, A: torch.Tensor, B: torch.Tensor, core: torch.Tensor
    ) -> None:
        """Write the core into ``weight`` (model dtype) and hook ``A``, ``B`` into the forward."""
        with torch.no_grad():
            update_offload_parameter(module, "weight", core.to(module.weight.dtype))
            with align_module_device(module):
                attach_wrappers(module, A, B)

    def _record(self, result: ARMORModuleResult, log: bool = True) -> None:
        self._results[result.name] = result
        self._compressed.append(result.name)
        if log:
            logger.info(result.log_line())
        if self._progress is None:
            self._progress = tqdm(total=len(self._modules), desc="ARMOR", unit="module")
        self._progress.update(1)

    def _close_progress(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _pending(self) -> list[nn.Module]:
        done = set(self._compressed)
        return [m for name, m in self._modules.items() if name not in done]

    def _require_tokens(self, modules: list[nn.Module]) -> None:
        empty = [
            self._module_names[m]
            for m in modules
            if m not in self._stats or self._stats[m].num_tokens == 0
        ]
        if empty:
            self._close_progress()
            raise ValueError(
                f"ARMOR received no calibration tokens for {len(empty)} modules: {empty}. The "
                "calibration set is empty or these modules never ran; pass a non-empty `dataset` "
                "to oneshot or add them to `ignore`."
            )

    @property
    def effective_calibration(self) -> str:
        """``calibration``, or its default for the objective when it is ``None``."""
        if self.calibration is not None:
            return self.calibration
        return "sequential" if self.objective == "output" else "dense"

    @property
    def needs_hessian(self) -> bool:
        """Whether the layer Hessian ``X^T X / N`` is collected (``[n, n]`` per target)."""
        return self.objective == "output" or self.init == "sparsegpt"

    def _empty_statistics(self, module: nn.Linear) -> InputStatistics:
        return InputStatistics.empty(
            module.in_features, get_execution_device(module), with_gram=self.needs_hessian
        )

    def _cost(self, module: nn.Linear) -> int:
        """Per-iteration cost ``~ m n b`` used to balance ranks."""
        m, n = module.weight.shape
        return m * n * choose_wrapper_block_size(m, n, self.wrapper_block_size)


def register() -> None:
    """Make ``ARMORModifier`` available to YAML recipes (idempotent)."""
    if ModifierFactory._registered_registry.get("ARMORModifier") is not ARMORModifier:
        ModifierFactory.register("ARMORModifier", ARMORModifier)


register()
