"""``ARMORGPTQModifier``: GPTQ that keeps every pruned zero (2:4 + W4A16 / W8A8 that keeps 2:4).

llm-compressor 0.13 removed the code that kept GPTQ from filling pruned zeros, so its
``GPTQModifier`` breaks every 2:4 core (docs/stack.md, "GPTQ and 2:4"). This subclass keeps
llm-compressor's whole GPTQ machinery (schemes, observers, Hessian hooks, distribution,
compressed-tensors parameters) and replaces only the per-module solve with
:func:`armor_modifier.core.gptq.masked_gptq`: GPTQ whose quantizer sends every pruned position
to zero, so the result changes kept weights only and every 2:4 core stays 2:4.

For an ARMOR Linear the Hessian hook sees the core's real inputs ``B x`` (ARMOR's input wrapper is
a forward pre-hook that runs first), so the Hessian is ``B H Bᵀ``, not ``H``. The wrappers ``A``
and ``B`` stay in full precision; after its core is quantized they are refitted (``refit_wrappers``
passes of :func:`armor_modifier.core.wrapper_refit.refit_wrappers`) so that the layer's output
on the calibration inputs matches its output before quantization. Scales and zero-points come
from the module's weight observer, exactly as ``GPTQModifier`` computes them, so armor-ct stores
the result with compressed-tensors' ``pack-quantized`` (W4A16) or ``int-quantized`` (W8A8) format
and reloads bit for bit.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.quantization import QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.utils import getattr_chain, match_named_modules, update_offload_parameter
from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.helpers import update_batch_qparams
from llmcompressor.modifiers.quantization.quantization.mixin import QuantizationMixin
from llmcompressor.utils.dist import broadcast_qparams_and_cleanup
from loguru import logger
from pydantic import PrivateAttr, field_validator, model_validator
from torch import nn

from armor_modifier.core import wrapper_refit
from armor_modifier.core.errors import (
    ARMORCompressionError,
    ARMORValueError,
    HessianNotPositiveDefinite,
)
from armor_modifier.core.gptq import masked_gptq
from armor_modifier.core.reconstruct import ReconstructionSettings
from armor_modifier.runtime import ARMOR_A, ARMOR_B, is_armor_linear

from .checks import check_guard_windows
from .collectives import gather_owners
from .gptq_reconstruction import QuantizedReconstruction, replayable_targets
from .reconstruction import LayerReconstruction, summarize_reconstructions

__all__ = ["ARMORGPTQModifier", "ColumnGrid"]

#: group sizes offered when one does not divide a layer's width
_GROUP_SIZES = (32, 64, 96, 128, 256)
#: ``refit_wrappers`` when none is given (how it was chosen: docs/results.md#gptq_tuning)
DEFAULT_REFIT_PASSES = 4
#: ``dampening_frac`` when none is given, not GPTQModifier's 0.01 (docs/results.md#gptq_tuning)
DEFAULT_DAMPENING = 0.1


class ARMORGPTQModifier(GPTQModifier):
    """GPTQ for 2:4 models that keeps every pruned position exactly zero.

    Put it after ``ARMORModifier`` (or after a plain 2:4 pruning) in a recipe, with the fields of
    llm-compressor's ``GPTQModifier`` (``scheme``, ``targets``, ``ignore``, ``block_size``,
    ``dampening_frac``, ``config_groups``) and ``static_groups``. Zeros of each weight are
    kept: the mask is ``weight != 0`` when the module is calibrated (for ARMOR Linears the 2:4
    core). Integer weight schemes only (W4A16 with a group size dividing every target's
    ``in_features``, W8A8 / W8A16 per channel); FP8 stays round-to-nearest
    (``QuantizationModifier``). ``actorder="weight"`` (alias ``"static"``) visits columns by
    descending Hessian diagonal during calibration only (the stored layout is unchanged and the
    mask, per entry, is kept); ``"group"`` (a stored column permutation) is refused. On ARMOR
    Linears the full-precision wrappers are then refitted to the quantized core
    (``refit_wrappers``), and with ``reconstruction_steps`` each decoder layer's wrappers and
    scales are fitted jointly to its unquantized output (:mod:`.gptq_reconstruction`). Measured
    effect of each: ``docs/results.md`` (the GPTQ sections).

    Sample yaml (after ``import armor_modifier.modifier``)::

        quant_stage:
          quantization_modifiers:
            ARMORGPTQModifier:
              targets: ["Linear"]
              ignore: ["re:.*lm_head"]
              config_groups:
                group_0:
                  targets: ["Linear"]
                  weights: {num_bits: 4, type: int, symmetric: true, strategy: group,
                            group_size: 64}
    """

    actorder: Any = None
    batched_quantization: Any = None
    #: ``lambda / mean(diag H)`` added to the Hessian's diagonal (``DEFAULT_DAMPENING`` when
    #: ``None``)
    dampening_frac: float | None = DEFAULT_DAMPENING
    #: group strategies: ``False`` fits each group's scale (and zero-point) when GPTQ reaches the
    #: group, from its weights as compensated so far; ``True`` fits every group once, from the
    #: weight before GPTQ (llm-compressor's ``GPTQModifier``). Channel and tensor strategies are
    #: always fitted once. Measured effect of both: docs/results.md#gptq_layer_check
    static_groups: bool = False
    #: ARMOR Linears: passes of wrapper refitting after the core is quantized (exact update of
    #: ``A``, one conjugate-gradient step on ``B``, each kept only if the layer's output error on
    #: the calibration inputs does not rise); 0 leaves the wrappers as ``ARMORModifier`` made
    #: them. Other Linears have no wrappers and ignore it
    refit_wrappers: int = DEFAULT_REFIT_PASSES
    #: Adam steps per decoder layer after its cores are quantized (and refitted), fitting its
    #: ARMOR Linears' wrappers and, with ``reconstruction_scales``, the quantization scales to
    #: the layer's output before quantization; integer codes and masks stay, the best iterate on
    #: held-out windows is kept (docs/algorithm.md, "Reconstruction after GPTQ"; measured:
    #: docs/results.md#gptq_reconstruction). 0: off
    reconstruction_steps: int = 0
    #: Adam learning rate of that fit
    reconstruction_learning_rate: float = 1e-4
    #: whether the scales move with the wrappers in that fit (else the wrappers alone)
    reconstruction_scales: bool = True
    #: autocast dtype of that fit's steps ('auto': bfloat16 where the CPU or GPU multiplies it
    #: natively, else float32; as ``ARMORModifier.reconstruction_precision``)
    reconstruction_precision: Literal["auto", "float32", "bfloat16"] = "auto"
    #: names of the modules this process quantized in the current ``compress_modules``
    _quantized_here: list[str] = PrivateAttr(default_factory=list)
    _layer_fit: QuantizedReconstruction | None = PrivateAttr(default=None)

    @field_validator("refit_wrappers")
    @classmethod
    def _passes_not_negative(cls, value: int) -> int:
        if value < 0:
            raise ARMORValueError(
                f"refit_wrappers={value}: give the number of refit passes, 0 (off) or more"
            )
        return value

    @model_validator(mode="after")
    def _check_reconstruction(self) -> ARMORGPTQModifier:
        self.reconstruction_settings  # noqa: B018  (checks the fields on creation)
        return self

    @property
    def reconstruction_settings(self) -> ReconstructionSettings:
        """The reconstruction-after-GPTQ fields as checked settings (the rest at their
        defaults: 2 windows a step, 1/8 of the windows held out)."""
        return ReconstructionSettings(steps=self.reconstruction_steps, parameters="wrappers",
                                      learning_rate=self.reconstruction_learning_rate,
                                      precision=self.reconstruction_precision)  # fmt: skip

    @property
    def reconstructions(self) -> list[LayerReconstruction]:
        """Per decoder layer, what the reconstruction after GPTQ did; kept after ``oneshot``."""
        return list(self._layer_fit.reconstructions) if self._layer_fit else []

    @field_validator("actorder", mode="before")
    @classmethod
    def _weight_order_only(cls, value: Any) -> Any:
        return _checked_actorder(value, "actorder")

    def resolve_quantization_config(self) -> Any:
        """The schemes as ``QuantizationMixin`` resolves them (``GPTQModifier``'s own resolution
        would write its ``actorder`` into every scheme); each scheme's ``actorder`` checked."""
        config = QuantizationMixin.resolve_quantization_config(self)
        for name, scheme in config.config_groups.items():
            order = getattr_chain(scheme, "weights.actorder", None)
            _checked_actorder(order, f"config group {name!r}: weights.actorder")
        return config

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        """Check every target against its scheme (before llm-compressor touches the model), then
        GPTQModifier's initialisation."""
        config = self.resolve_quantization_config()
        for scheme in config.config_groups.values():
            targets = scheme.targets or self.resolved_targets
            for name, module in match_named_modules(state.model, targets, self.ignore):
                if isinstance(module, nn.Linear):
                    check_gptq_scheme(name, module, scheme.weights)
        check_guard_windows(self.reconstruction_settings, state.data.calib)
        return super().on_initialize(state, **kwargs)

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """GPTQModifier's hooks, and with ``reconstruction_steps`` the decoder layers' capture."""
        super().on_calibration_start(state, event, **kwargs)
        self._layer_fit = None
        if self.reconstruction_steps:
            targets = replayable_targets(state.model, self._module_names)
            self._layer_fit = QuantizedReconstruction(
                state.model, targets, self.reconstruction_settings, self.register_hook,
                self.reconstruction_scales,
            )  # fmt: skip
            self._layer_fit.register_hooks()

    def on_sequential_epoch_end(
        self, state: State, event: Event, modules: list[nn.Module], **kwargs: Any
    ) -> None:
        """GPTQModifier's quantization of the subgraph, then the reconstruction of its layers."""
        super().on_sequential_epoch_end(state, event, modules, **kwargs)
        if self._layer_fit is not None:
            self._layer_fit.process_quantized(modules)

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        """GPTQModifier's end of calibration; the reconstruction's summary, its captures freed."""
        super().on_calibration_end(state, event, **kwargs)
        if self._layer_fit is not None:
            self._layer_fit.release()
            fitted = self._layer_fit.reconstructions
            logger.info(summarize_reconstructions(fitted, QuantizedReconstruction.what))

    def compress_modules(self) -> None:
        """GPTQModifier's (under torchrun each rank quantizes its share and the quantized
        parameters are broadcast), then the refitted wrappers are broadcast the same way, each
        from the rank that recorded quantizing its module (:meth:`compress_module_list`).

        Gathering those records is a collective, so no rank goes on before every rank has
        written its modules. On CPU llm-compressor's broadcast skips them (the ranks share the
        offloaded tensors), and without that wait a rank could propagate through a module
        another rank was still writing: two-rank runs with ``refit_wrappers=0`` can still differ
        from run to run (GPTQModifier's own flow).
        """
        self._quantized_here = []
        super().compress_modules()
        if not (is_distributed() and self.refit_wrappers):
            return
        modules = {name: module for module, name in self._module_names.items()}
        owner = {modules[name]: rank for name, rank in gather_owners(self._quantized_here).items()}
        armor = [module for module in owner if is_armor_linear(module)]
        broadcast_qparams_and_cleanup(armor, owner, [ARMOR_A, ARMOR_B])

    def compress_module_list(self, module_list: list[nn.Module]) -> None:
        """Quantize each calibrated module with mask-preserving GPTQ (one module at a time) and
        refit the wrappers of ARMOR Linears to their quantized cores."""
        done: list[str] = []
        for module in module_list:
            name = self._module_names[module]
            quant_args: Any = getattr_chain(module, "quantization_scheme.weights")
            observer: Any = module.weight_observer
            qparams = observer.get_qparams()
            hessian = self._hessians.pop(module)
            count = self._num_samples.pop(module).to(hessian.device)
            with torch.no_grad():
                weight: torch.Tensor = module.get_parameter("weight").detach()
                grid = ColumnGrid(qparams["scale"], qparams["zero_point"], quant_args, observer)
                fit_groups = not self.static_groups and grid.group_size is not None
                actorder = _checked_actorder(self.actorder or quant_args.actorder, "actorder")
                order = None
                if actorder is not None:
                    order = torch.argsort(hessian.diagonal(), descending=True)
                try:
                    result = masked_gptq(
                        weight,
                        hessian / count,
                        grid,
                        block_size=self.block_size,
                        dampening_frac=self.dampening_frac or DEFAULT_DAMPENING,
                        fit_group=grid.fit if fit_groups else None,
                        group_size=grid.group_size if fit_groups else None,
                        order=order,
                    )
                except HessianNotPositiveDefinite as err:
                    raise ARMORCompressionError(name, done, str(err)) from err
                refit_note = ""
                if self.refit_wrappers and is_armor_linear(module):
                    fitted = wrapper_refit.refit_wrappers(
                        getattr(module, ARMOR_A),
                        getattr(module, ARMOR_B),
                        weight.to(hessian.dtype),
                        result.weight.to(hessian.dtype),
                        hessian / count,
                        self.refit_wrappers,
                    )
                    update_offload_parameter(module, ARMOR_A, fitted.A)
                    update_offload_parameter(module, ARMOR_B, fitted.B)
                    refit_note = (
                        f", wrappers refitted: output error {fitted.loss_before:.4g} -> "
                        f"{fitted.loss_after:.4g}"
                    )
                update_batch_qparams(
                    [module],
                    result.weight.unsqueeze(0),
                    grid.scale.unsqueeze(0),
                    grid.zero_point.unsqueeze(0),
                    None,
                    quant_args,
                )
            logger.info(
                f"ARMOR GPTQ {name}: loss {result.loss:.4g}, zeros kept "
                f"({int((weight == 0).sum())} of {weight.numel()}), "
                f"{result.num_damping_increases} damping increases{refit_note}"
            )
            done.append(name)
            self._quantized_here.append(name)
            self._num_compressed_modules += 1


def _checked_actorder(value: Any, what: str) -> str | None:
    """``None`` or ``"weight"`` (``"static"`` is its alias); anything else is refused."""
    if value is None or value is False:
        return None
    text = str(getattr(value, "value", value)).lower()
    if text in ("weight", "static"):
        return "weight"
    raise ARMORValueError(
        f"{what}={text!r}: ARMORGPTQModifier supports actorder 'weight' (alias 'static': columns "
        "visited by activation order, layout unchanged) or null; 'group' would store a column "
        "permutation that 2:4 kernels do not read"
    )


def check_gptq_scheme(name: str, module: nn.Linear, args: Any) -> None:
    """Refuse what mask-preserving GPTQ does not do: non-integer (FP8, FP4) weights and a group
    size that does not divide the module's ``in_features``.

    :param args: the weight ``QuantizationArgs`` the module will get (``None``: not quantized)
    """
    if args is None:
        return
    if args.type != QuantizationType.INT:
        raise ARMORValueError(
            f"{name}: ARMORGPTQModifier quantizes to integer grids; weights of type {args.type} "
            "stay round-to-nearest: use QuantizationModifier(scheme='FP8_DYNAMIC') for FP8"
        )
    if args.strategy == QuantizationStrategy.GROUP:
        n = module.weight.shape[1]
        if n % args.group_size:
            fitting = [g for g in _GROUP_SIZES if n % g == 0]
            raise ARMORValueError(
                f"{name}: group_size {args.group_size} does not divide in_features {n}; group "
                f"sizes that do: {fitting}. Set weights.group_size to one of them"
            )
    elif args.strategy not in (QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR):
        raise ARMORValueError(
            f"{name}: ARMORGPTQModifier supports the group, channel and tensor weight "
            f"strategies, got {args.strategy}"
        )


class ColumnGrid:
    """A module's weight grid, column by column: ``quantize(columns [m, k], first)`` for
    :func:`~armor_modifier.core.gptq.masked_gptq`, and ``fit`` to recompute one group's scale
    and zero-point with a fresh observer of the module's observer type.

    :ivar scale: ``[m, n / group_size]`` (group), ``[m, 1]`` (channel) or ``[1]`` (tensor); a copy
        of the one passed in, rewritten group by group by ``fit``
    :ivar zero_point: same shape as ``scale``
    :ivar group_size: columns per group (group strategy), else ``None``
    """

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, args: Any, observer: Any
    ) -> None:
        self.scale = scale.clone()
        self.zero_point = zero_point.clone()
        self.args = args
        self.observer = observer
        self.group_size: int | None = (
            args.group_size if args.strategy == QuantizationStrategy.GROUP else None
        )
        self._per_column = args.model_copy(update={"strategy": QuantizationStrategy.CHANNEL})

    def _column_params(self, index: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale.numel() == 1:
            return self.scale.expand(m, 1), self.zero_point.expand(m, 1)
        s, z = self.scale.reshape(m, -1), self.zero_point.reshape(m, -1)
        return s[:, index : index + 1], z[:, index : index + 1]

    def __call__(self, columns: torch.Tensor, first: int) -> torch.Tensor:
        """Fake-quantize ``columns [m, k]`` (the weight's columns ``first .. first + k - 1``)."""
        out = torch.empty_like(columns)
        m = columns.shape[0]
        for k in range(columns.shape[1]):
            index = 0 if self.group_size is None else (first + k) // self.group_size
            s, z = self._column_params(index, m)
            out[:, k : k + 1] = fake_quantize(
                columns[:, k : k + 1], s.to(columns.device), z.to(columns.device), self._per_column
            )
        return out

    def fit(self, columns: torch.Tensor, first: int) -> None:
        """Recompute the scale and zero-point of the group starting at column ``first`` from
        ``columns [m, group_size]`` (the module's observer type, on those columns alone)."""
        if self.group_size is None:
            raise ARMORValueError("fit needs a group strategy; channel and tensor grids are fixed")
        observer = type(self.observer)(base_name="weight", args=self.args.model_copy(deep=True))
        observer(columns.contiguous())
        qparams = observer.get_qparams()
        index = first // self.group_size
        self.scale[:, index] = qparams["scale"].reshape(-1).to(self.scale)
        self.zero_point[:, index] = qparams["zero_point"].reshape(-1).to(self.zero_point)
