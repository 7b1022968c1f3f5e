"""The transformers loader for armor-ct: ``AutoModelForCausalLM.from_pretrained(path)`` after
``import armor_modifier``, no ``trust_remote_code``.

:class:`ARMORCTConfig` and :class:`ARMORCTHfQuantizer` subclass transformers' compressed-tensors
config and quantizer, so quantized cores go through compressed-tensors' own schemes and
compressors. Loading then runs:

0. parse ``quantization_config``: the ``armor`` block (:mod:`.config`), compressed-tensors' keys,
   and only formats armor-ct stores (``STORABLE_CT_FORMATS``). A ``compressed-tensors`` config that
   carries an ``armor`` block (a mislabelled armor-ct checkpoint) never reaches this loader;
   :func:`check_not_mislabelled` refuses it for the CLI and dense export;
1. before weights: attach ``armor_A``/``armor_B`` buffers and hooks to every listed Linear; let
   compressed-tensors apply its quantization (scales, compressed dtypes); give each listed Linear a
   ``weight [m, n/2]`` (the core's kept values, in the dtype compressed-tensors expects, or
   int32-packed for ``pack-quantized`` cores) and a ``weight_bitmask``; validate every safetensors
   header against this skeleton (:mod:`.validate`), so a damaged file fails with the
   module named;
2. transformers loads the tensors;
3. after weights: rebuild each dense ``[m, n]`` core from values and mask, then let
   compressed-tensors finish (dequantize when asked); install the armor-ct save hook.

The model keeps its ``quantization_config`` (an armor-ct model stays one when saved again).
Without this package transformers warns about the unknown ``quant_method`` and then fails on the
``[m, n/2]`` core (size mismatch): never a silently different model.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pydantic
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import auto as hf_auto
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.utils import logging
from transformers.utils.quantization_config import CompressedTensorsConfig

from armor_modifier.runtime import attach_wrappers

from .codec import ARMOR_CT, BITMASK, ARMORCheckpointError, decompress_core
from .config import ARMORBlock, parse_armor_block
from .hooks import install_save_hook
from .packed import PACKED, decompress_packed_core, packed_columns
from .save import STORABLE_CT_FORMATS
from .validate import _REBUILD, validate_checkpoint

__all__ = ["ARMORCTConfig", "ARMORCTHfQuantizer", "check_not_mislabelled", "register"]

logger = logging.get_logger(__name__)

#: compressed-tensors' top-level ``format`` when config groups use different formats.
MIXED = "mixed-precision"
_FORMAT_FIX = (
    f"armor-ct format 1 stores 2:4 cores only in the compressed-tensors formats "
    f"{list(STORABLE_CT_FORMATS)}; the config.json was altered or not written by armor-modifier "
    "(re-save the model with one of those quantization schemes)"
)


class ARMORCTConfig(CompressedTensorsConfig):
    """``quantization_config`` of an armor-ct checkpoint: compressed-tensors' config plus the
    ``armor`` block and ``sparsity_config``.

    :param armor: the ``armor`` block (validated by :func:`.config.parse_armor_block`); may be
        omitted only when the config is passed to ``from_pretrained`` to override loading
        attributes (``dequantize``)
    :param sparsity_config: compressed-tensors ``sparse-24-bitmask`` config (informational)
    :param kwargs: compressed-tensors quantization keys (``config_groups``, ``format``, ...)
    :raises ARMORCheckpointError: for a malformed ``armor`` block, quantization keys
        compressed-tensors rejects, or a compressed-tensors format armor-ct cannot store
    """

    def __init__(
        self,
        armor: dict[str, Any] | None = None,
        sparsity_config: dict[str, Any] | None = None,
        quant_method: str = ARMOR_CT,
        **kwargs: Any,
    ):
        self.armor_block: ARMORBlock | None = None if armor is None else parse_armor_block(armor)
        self.sparsity_config = sparsity_config
        _check_stated_formats(kwargs)
        try:
            super().__init__(**kwargs)
        except pydantic.ValidationError as err:
            first = err.errors()[0]
            # pydantic names validator steps in loc ("function-after[...]"): keep the field path
            where = ".".join(str(part) for part in first["loc"] if "[" not in str(part))
            raise ARMORCheckpointError(
                f"quantization_config: compressed-tensors rejects its quantization keys ({where}: "
                f"{first['msg']}, got {reprlib.repr(first.get('input'))}); the config.json is "
                "damaged or was written by an incompatible compressed-tensors version"
            ) from err
        method: Any = ARMOR_CT  # transformers types quant_method as its own enum
        self.quant_method = method
        if self.is_quantized:
            _check_inferred_formats(self.quantization_config)

    def post_init(self) -> None:
        if self.is_quantized:
            super().post_init()

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict() if self.is_quantized else {}
        data["quant_method"] = ARMOR_CT
        data["sparsity_config"] = self.sparsity_config
        if self.armor_block is not None:
            data["armor"] = self.armor_block.to_dict()
        return data

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class ARMORCTHfQuantizer(CompressedTensorsHfQuantizer):
    """Loads armor-ct checkpoints (see the module docstring for the steps)."""

    quantization_config: ARMORCTConfig

    def __init__(self, quantization_config: ARMORCTConfig, **kwargs: Any):
        if getattr(quantization_config, "armor_block", None) is None:
            raise ARMORCheckpointError(
                f"quantization_config has quant_method {ARMOR_CT!r} but no 'armor' block; the "
                "config.json is damaged or was not written by armor-modifier"
            )
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        super().validate_environment(*args, **kwargs)
        if self.use_fp8_kernel:
            logger.warning(
                "armor-ct: ignoring use_optimized_inference=True; its FP8 Linear replacement would "
                "drop the ARMOR wrappers. Use armor_modifier.cuda.to_semi_structured for kernels."
            )
            self.use_fp8_kernel = False

    @property
    def _block(self) -> ARMORBlock:
        block = self.quantization_config.armor_block
        if block is None:
            raise ARMORCheckpointError(
                "the armor-ct quantization_config has no 'armor' block; load the checkpoint's own "
                "config.json (pass no quantization_config override without it)"
            )
        return block

    def _linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        block = self._block
        linears = {}
        for name, (b_a, b_b) in block.modules.items():
            try:
                module = model.get_submodule(name)
            except AttributeError as err:
                raise ARMORCheckpointError(
                    f"{name}: listed in armor.modules but {type(model).__name__} has no such "
                    "module; load the checkpoint with the model class that saved it"
                ) from err
            if not isinstance(module, nn.Linear):
                raise ARMORCheckpointError(
                    f"{name}: listed in armor.modules but is {type(module).__name__}, not an "
                    f"nn.Linear; config.json does not match {type(model).__name__} ({_REBUILD})"
                )
            m, n = module.out_features, module.in_features
            if m % b_a or n % b_b or n % 4:
                raise ARMORCheckpointError(
                    f"{name}: wrapper blocks [{b_a}, {b_b}] in armor.modules do not tile the "
                    f"{m}x{n} weight (b_A must divide out_features {m}, b_B in_features {n}, and "
                    f"4 in_features); config.json does not match {type(model).__name__} "
                    f"({_REBUILD})"
                )
            linears[name] = module
        return linears

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any):
        block = self._block
        linears = self._linears(model)
        for name, linear in linears.items():
            b_a, b_b = block.modules[name]
            m, n = linear.weight.shape
            like: dict[str, Any] = {"device": linear.weight.device, "dtype": linear.weight.dtype}
            attach_wrappers(
                linear,
                torch.empty(m // b_a, b_a, b_a, **like),
                torch.empty(n // b_b, b_b, b_b, **like),
            )
        if self.quantization_config.is_quantized:
            super()._process_model_before_weight_loading(model, **kwargs)
        self._packed_bits: dict[str, int] = {}
        for name, linear in linears.items():
            self._register_core(name, linear)
        files = kwargs.get("checkpoint_files")
        if files and all(str(f).endswith(".safetensors") for f in files):
            validate_checkpoint(files, model, block)
        elif files:
            raise ARMORCheckpointError(
                f"armor-ct checkpoints are safetensors files, got {[str(f) for f in files]}"
            )

    def _register_core(self, name: str, linear: nn.Linear) -> None:
        """Give ``linear`` the armor-ct layout: ``weight`` = the core's kept values (in the dtype,
        or for bit-packed cores the int32 packing, compressed-tensors expects) + the bitmask."""
        m, n = linear.out_features, linear.in_features
        packed = getattr(linear, PACKED, None)
        if isinstance(packed, torch.Tensor):
            scheme: Any = linear.quantization_scheme
            bits = int(scheme.weights.num_bits)
            self._packed_bits[name] = bits
            delattr(linear, PACKED)
            shape, dtype, device = (m, packed_columns(n // 2, bits)), torch.int32, packed.device
        else:
            weight = linear.weight
            shape, dtype, device = (m, n // 2), weight.dtype, weight.device
        linear.weight = nn.Parameter(
            torch.empty(shape, dtype=dtype, device=device), requires_grad=False
        )
        bitmask = torch.empty(m, (n + 7) // 8, dtype=torch.uint8, device=device)
        linear.register_parameter(BITMASK, nn.Parameter(bitmask, requires_grad=False))

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any):
        for name, linear in self._linears(model).items():
            values = linear.weight
            bitmask = getattr(linear, BITMASK).data
            shape = (linear.out_features, linear.in_features)
            delattr(linear, BITMASK)
            bits = self._packed_bits.get(name)
            if bits is None:
                dense = decompress_core(values.data, bitmask, shape[1], name)
                linear.weight = nn.Parameter(dense, requires_grad=values.requires_grad)
                continue
            packed = decompress_packed_core(values.data, bitmask, shape, bits, name)
            delattr(linear, "weight")
            linear.register_parameter(PACKED, nn.Parameter(packed, requires_grad=False))
        if self.quantization_config.is_quantized:
            super()._process_model_after_weight_loading(model, **kwargs)
        install_save_hook(model, recipe=self._block.recipe)
        return model

    def postprocess_model(self, model: PreTrainedModel, **kwargs: Any):
        """Keep ``quantization_config`` even with ``dequantize=True``: the model still carries
        ARMOR wrappers (and, when quantized, compressed-tensors' activation quantization)."""
        model.config.quantization_config = self.quantization_config
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.config._is_quantized = True
        return self._process_model_after_weight_loading(model, **kwargs)


def _check_stated_formats(ct_keys: dict[str, Any]) -> None:
    """Refuse compressed-tensors formats armor-ct cannot store, as written in config.json: the
    top-level ``format`` (``mixed-precision`` when groups differ) and each group's ``format``."""
    stated = {"format": ct_keys.get("format")}
    groups = ct_keys.get("config_groups")
    if isinstance(groups, dict):
        for group, scheme in groups.items():
            if isinstance(scheme, dict):
                stated[f"config_groups.{group}.format"] = scheme.get("format")
    for where, fmt in stated.items():
        allowed = (*STORABLE_CT_FORMATS, MIXED) if where == "format" else STORABLE_CT_FORMATS
        if fmt is not None and fmt not in allowed:
            raise ARMORCheckpointError(f"quantization_config.{where} is {fmt!r}; {_FORMAT_FIX}")


def _check_inferred_formats(ct_config: Any) -> None:
    """A group without ``format`` is compressed in the format compressed-tensors infers for it."""
    from compressed_tensors.compressors.format import infer_module_format

    if ct_config.quantization_status != "compressed":
        return
    for group, scheme in ct_config.config_groups.items():
        if scheme.format is not None or scheme.weights is None:
            continue
        fmt = getattr(infer_module_format(nn.Linear, scheme), "value", None)
        if fmt not in STORABLE_CT_FORMATS:
            raise ARMORCheckpointError(
                f"quantization_config.config_groups.{group} has no format and compressed-tensors "
                f"stores its scheme as {fmt!r}; {_FORMAT_FIX}"
            )


def check_not_mislabelled(folder: str | os.PathLike) -> None:
    """Raise if ``folder``'s ``config.json`` is an armor-ct checkpoint labelled
    ``compressed-tensors`` (an ``armor`` block under another ``quant_method``).

    transformers would hand such a folder to compressed-tensors, which fails deep inside
    transformers (sparse cores) or loads ``[m, n/2]`` cores into a model that breaks on its first
    forward. Replacing transformers' compressed-tensors config class to catch this in
    ``from_pretrained`` would patch transformers globally, so the check is explicit: the ``armor``
    CLI and :func:`~armor_modifier.export_dense` run it before loading.
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    inner = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(inner, dict) and "armor" in inner and inner.get("quant_method") != ARMOR_CT:
        raise ARMORCheckpointError(
            f"quantization_config has quant_method {inner.get('quant_method')!r} but carries "
            f"an 'armor' block: an armor-ct checkpoint mislabelled. If its weights hold "
            f'armor_A/armor_B/weight_bitmask tensors, set "quant_method": "{ARMOR_CT}" in '
            "config.json's quantization_config (and import armor_modifier before loading); "
            "otherwise delete the 'armor' block"
        )


def _register(mapping: MutableMapping[str, Any], cls: type, kind: str) -> None:
    existing = mapping.get(ARMOR_CT)
    if existing is cls:
        return
    if existing is not None and (existing.__module__, existing.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise ARMORCheckpointError(
            f"another {kind} ({existing.__module__}.{existing.__qualname__}) is already registered "
            f"with transformers for quant_method {ARMOR_CT!r}"
        )
    mapping[ARMOR_CT] = cls


def register() -> None:
    """Register the armor-ct config and quantizer with transformers (idempotent; run on
    ``import armor_modifier``). Loaded models get the armor-ct save hook on the instance; nothing
    of transformers is patched."""
    if ARMOR_CT not in hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        hf_auto.register_quantization_config(ARMOR_CT)(ARMORCTConfig)
    else:
        _register(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, ARMORCTConfig, "config")
    if ARMOR_CT not in hf_auto.AUTO_QUANTIZER_MAPPING:
        hf_auto.register_quantizer(ARMOR_CT)(ARMORCTHfQuantizer)
    else:
        _register(hf_auto.AUTO_QUANTIZER_MAPPING, ARMORCTHfQuantizer, "quantizer")
