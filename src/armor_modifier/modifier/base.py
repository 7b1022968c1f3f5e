"""``ARMORModifier``: ARMOR 2:4 pruning as an llm-compressor 0.14 modifier (fields + lifecycle).

The work is done by :class:`.compressor.LinearCompressor` (statistics to factors, per Linear) and
:class:`.reconstruction.Reconstruction` (the decoder-layer work); the settings fields come from
``SolverSettings`` and ``ReconstructionSettings`` (:mod:`.fields`, ``core.options``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from llmcompressor.core import Event, State, active_session
from llmcompressor.modifiers import Modifier
from loguru import logger
from pydantic import Field, PrivateAttr, create_model, model_validator
from torch import nn

from armor_modifier.core import SolverSettings
from armor_modifier.core.errors import ARMORValueError
from armor_modifier.core.problem import block_within_budget
from armor_modifier.core.reconstruct import RECONSTRUCTION_FIELDS, ReconstructionSettings
from armor_modifier.format.hooks import appended_recipe, install_save_hook

from .checks import (
    check_calibration_set,
    check_guard_windows,
    check_recipe_composition,
    check_shared_calibration_pass,
    checked_targets,
)
from .compressor import LinearCompressor
from .fields import PROGRESS_HELP, recorded_settings, run_info, settings_fields
from .layer_defaults import check_layer_calibration, resolve_unset_steps
from .memory import capture_bytes, check_memory
from .progress import LayerProgress, process_unit, start_fast_forward
from .reconstruction import LayerReconstruction, Reconstruction, summarize_reconstructions
from .report import ARMORModuleResult, summarize
from .stats import collect_dense_statistics

__all__ = ["ARMORModifier"]

_SettingsFields: Any = create_model("_SettingsFields", __base__=Modifier, **settings_fields())


class ARMORModifier(_SettingsFields):
    """ARMOR 2:4 pruning: each Linear ``W`` becomes ``A · S · B``, a 2:4 sparse core ``S`` between
    small block-diagonal wrappers ``A``, ``B``.

    Paper: https://arxiv.org/abs/2510.05528 (independent Apache-2.0 implementation). Each Linear's
    ``weight`` then holds the 2:4 core; hooks apply ``B`` before it, ``A`` after: ``A S B x + b``.

    Fields: ``targets``, ``ignore`` (``"re:.*lm_head"`` for the head), ``mask_structure`` (2:4),
    ``calibration`` (``"sequential"``: through the pruned layers; ``"dense"``: one pass of the
    unpruned model; default by objective), ``progress_dir``, every setting of docs/settings.md.

    Lifecycle: on_initialize resolves and checks the targets and the recipe; on_calibration_start
    checks that the statistics fit in memory (:mod:`.memory`), then hooks the targets
    (sequential) or collects dense statistics; on_sequential_epoch_end compresses that decoder
    layer's targets (with the decoder-layer work when on; under torchrun spread over ranks);
    on_calibration_end compresses what is left and logs the summary; on_finalize checks that
    nothing was left and installs the armor-ct ``save_pretrained`` hook. Quantize afterwards with
    ``QuantizationModifier`` or ``ARMORGPTQModifier`` (GPTQModifier fills the zeros: refused).
    """

    requires_calibration_data: bool = True

    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=list)
    mask_structure: Literal["2:4"] = "2:4"
    calibration: Literal["sequential", "dense"] | None = None
    progress_dir: str | None = Field(default=None, description=PROGRESS_HELP)

    _names: dict[nn.Linear, str] = PrivateAttr(default_factory=dict)
    _budget_block: int | None = PrivateAttr(default=None)
    _compressor: LinearCompressor | None = PrivateAttr(default=None)
    _reconstruction: Reconstruction | None = PrivateAttr(default=None)
    _layer: ReconstructionSettings | None = PrivateAttr(default=None)
    _progress: LayerProgress | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check_settings(self) -> ARMORModifier:
        self.solver_settings  # noqa: B018  (SolverSettings checks every field on creation)
        check_layer_calibration(self.reconstruction_settings, self.effective_calibration)
        return self

    @property
    def solver_settings(self) -> SolverSettings:
        """The solver fields as one checked :class:`SolverSettings`, with the block size the
        budget gave once the targets are known and ``wrapper_block_size`` is unset."""
        fields = dataclasses.fields(SolverSettings)
        settings = SolverSettings(**{f.name: getattr(self, f.name) for f in fields})
        if self._budget_block is not None and self.wrapper_block_size is None:
            settings = settings.replace(wrapper_block_size=self._budget_block)
        return settings

    @property
    def reconstruction_settings(self) -> ReconstructionSettings:
        """The decoder-layer fields as one checked :class:`ReconstructionSettings`; once the
        targets are known an unset ``reconstruction_steps`` is resolved (:mod:`.layer_defaults`),
        to 0 where a layer turned out not replayable."""
        if self._layer is not None:
            off = self._reconstruction is not None and self._reconstruction.capture.unsupported
            return dataclasses.replace(self._layer, steps=0) if off else self._layer
        fields = {name: getattr(self, name) for name in RECONSTRUCTION_FIELDS}
        return ReconstructionSettings.from_fields(fields, seed=self.seed)

    @property
    def budget_block_size(self) -> int | None:
        """The ``b`` the overhead budget gave the targets (``wrapper_block_size`` unset)."""
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
        return dict(self._compressor.results) if self._compressor else {}

    @property
    def compressed_modules(self) -> list[str]:
        """Names of the modules pruned and wrapped so far, in order."""
        return list(self._compressor.compressed) if self._compressor else []

    @property
    def reconstructions(self) -> list[LayerReconstruction]:
        """Per decoder layer, what reconstruction did; kept after ``oneshot``."""
        return list(self._reconstruction.reconstructions) if self._reconstruction else []

    def settings(self) -> dict[str, Any]:
        """What an armor-ct checkpoint records in ``armor.recipe`` (JSON-able)."""
        return recorded_settings(self)

    # ---- lifecycle -------------------------------------------------------------------------

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Resolve and check the target Linears and the rest of the recipe; no data yet."""
        modules = checked_targets(state.model, self.targets, self.ignore)
        check_calibration_set(state.data.calib)
        check_recipe_composition(self, active_session().lifecycle.recipe.modifiers)
        self._layer = None  # the fields' settings, resolved afresh
        self._layer = resolve_unset_steps(self.reconstruction_settings, self.effective_calibration,
                                          state.model, modules, state.data.calib)  # fmt: skip
        self._names = {module: name for name, module in modules.items()}
        if self.wrapper_block_size is None:
            shapes = [(module.out_features, module.in_features) for module in modules.values()]
            self._budget_block = block_within_budget(shapes, self.max_wrapper_overhead)
        self._compressor = LinearCompressor(
            self._names, self.solver_settings, from_budget=self.wrapper_block_size is None
        )
        budget = "" if self._budget_block is None else f"{self.max_wrapper_overhead:g} budget -> "
        logger.info(
            f"ARMOR will prune {len(modules)} Linear modules (objective={self.objective}, "
            f"calibration={self.effective_calibration}, wrapper_block_size={budget}"
            f"{self.wrapper_block_size or self._budget_block}, iterations={self.num_iterations})"
        )
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """Sequential: hook the targets (and the decoder layers). Dense: one unpruned pass."""
        compressor = self._engine()
        targets = {name: module for module, name in self._names.items()}
        check_shared_calibration_pass(self, active_session().lifecycle.recipe.modifiers, targets)
        layer = self.reconstruction_settings
        held = capture_bytes(state.model, state.data.calib) if layer.works_per_layer else 0
        check_memory(self._names, compressor.settings, self.effective_calibration, captures=held)
        if self.progress_dir is not None:
            info = run_info(self, self._names.values())
            self._progress = LayerProgress(self.progress_dir, info, self._names).open()
        if self.effective_calibration == "dense":
            if state.data.calib is None:
                raise ARMORValueError("calibration='dense' needs calibration data: pass `dataset=`")
            collect_dense_statistics(self, state.model, state.data.calib, self._names,
                                     compressor.statistics, compressor.settings.needs_hessian)
            return
        for module in self._names:
            self.register_hook(module, self.calibrate_module, "forward")
        if self._progress is not None:
            start_fast_forward(self._progress, self, state.model, list(self._names))
        if layer.works_per_layer:
            check_guard_windows(layer, state.data.calib)
            optional = self.reconstruction_steps is None and not layer.propagate_within_layer
            self._reconstruction = Reconstruction(
                state.model, targets, layer, compressor.compress, compressor.reset_statistics,
                self.register_hook, optional,
            )  # fmt: skip
            self._reconstruction.register_hooks()

    def calibrate_module(
        self, module: nn.Linear, args: tuple[torch.Tensor, ...], _output: torch.Tensor
    ) -> None:
        """Forward hook: add the input to the module's statistics (:mod:`.stats`), unless its
        layer will be loaded from the progress folder (:meth:`.LayerProgress.wants_statistics`)."""
        if not self._progress or self._progress.wants_statistics(module, args[0]):
            self._engine().add_input(module, args[0])

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module] | None = None, **kwargs: Any
    ) -> None:
        """Compress this subgraph's targets (the next subgraph then sees the pruned layers)."""
        in_subgraph = {id(module) for module in modules or []}
        pending = [m for m in self._engine().pending() if id(m) in in_subgraph]
        if self._progress is not None:
            process_unit(self._progress, pending, self._engine(), self._reconstruction)
        elif self._reconstruction is not None:
            self._reconstruction.process(pending)
        else:
            self._engine().compress(pending)

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        """Compress what is left, remove the hooks and log the summary."""
        self.remove_hooks()
        compressor = self._engine()
        compressor.compress(compressor.pending())
        compressor.close()
        fitted = self._reconstruction.reconstructions if self._reconstruction else []
        logger.info(summarize(compressor.results.values(), fitted))
        if self._progress is not None:
            logger.info(self._progress.finish())
        if self._reconstruction is not None:
            self._reconstruction.release()
            if self.reconstruction_settings.fit_steps > 0:
                logger.info(summarize_reconstructions(fitted))

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        """Check that every target was compressed; route ``save_pretrained`` to armor-ct."""
        self.remove_hooks()
        compressor = self._engine()
        compressor.close()
        left = [self._names[m] for m in compressor.pending()]
        compressor.statistics.clear()
        if left:
            raise ARMORValueError(
                f"ARMOR did not compress {len(left)} target modules: {left}; calibration never "
                "reached them (did oneshot get a dataset?)"
            )
        # after oneshot wrapped save_pretrained: the armor-ct hook must sit outside that wrapper
        install_save_hook(state.model, recipe=appended_recipe(state.model, self.settings()))
        return True

    def _engine(self) -> LinearCompressor:
        if self._compressor is None:
            raise ARMORValueError("ARMORModifier was not initialised (run it through oneshot)")
        return self._compressor
