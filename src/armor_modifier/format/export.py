"""Dense export: an armor-ct checkpoint multiplied out into a plain Hugging Face checkpoint.

Every wrapped Linear gets ``W_hat = blockdiag(A) · core · blockdiag(B)`` (computed in fp32, stored
in the checkpoint's dtype); quantized cores are dequantized first and compressed-tensors
quantization is removed, so the result has no ``quantization_config`` and loads in any stock
runtime (no speed-up, full compatibility). With quantized cores the exported model also drops the
activation quantization, so it matches the armor-ct model run with quantization disabled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from armor_modifier.core.errors import ARMORCheckpointError
from armor_modifier.runtime import armor_linears, detach_wrappers, effective_weight
from armor_modifier.staging import (
    WEIGHT_FILE_SUFFIXES,
    copy_extra_files,
    resolve_target,
    staged_replace,
)

from .codec import ARMOR_CT
from .hooks import remove_save_hook

__all__ = ["export_dense", "densify_model"]

#: Top-level entries of the source never copied into an export: a git clone's history (with
#: git-lfs it holds every weight file again) and ``huggingface_hub``'s download records, which
#: describe the source's weights, not the export's.
NOT_EXPORTED = (".git", ".cache")


def _not_exported(name: str) -> bool:
    return name.endswith(WEIGHT_FILE_SUFFIXES) or name in NOT_EXPORTED


def _model_class(config: dict) -> Any:
    import transformers

    for name in config.get("architectures") or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def densify_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Multiply out the wrappers of every ARMOR Linear of a loaded armor-ct model, in place, and
    strip quantization so it saves as a plain checkpoint.

    :param dtype: dtype of the multiplied-out weights (default: the model's)
    :return: number of Linears multiplied out
    """
    from compressed_tensors.quantization.quant_metadata import QuantizationMetadata

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and quantizer.quantization_config.is_quantized:
        quantizer.compressor.decompress_model(model)
    model_dtype: Any = model.dtype
    dtype = dtype or model_dtype
    linears = armor_linears(model)
    with torch.no_grad():
        for linear in linears.values():
            weight = effective_weight(linear).to(dtype)
            detach_wrappers(linear)
            linear.weight = nn.Parameter(weight, requires_grad=False)
    for module in model.modules():
        if hasattr(module, "quantization_scheme"):
            QuantizationMetadata.clear_quantization(module)
            for attr in ("quantization_status", "quantization_enabled"):
                if hasattr(module, attr):
                    delattr(module, attr)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    config: Any = model.config
    config._is_quantized = False
    remove_save_hook(model)
    model.to(dtype)
    return len(linears)


def export_dense(
    src: str | os.PathLike, dst: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> Path:
    """Write ``src`` (an armor-ct checkpoint folder) as a plain dense checkpoint in ``dst``.

    Loadable by stock transformers without this package. Files of ``src`` that are not weights
    (tokenizer, ``recipe.yaml``, ...) are copied, regular files only (see
    :func:`.staging.copy_extra_files`; ``.git`` and ``.cache`` are not). ``dst`` is written to a
    staging folder next to it and swapped into place (:func:`.staging.staged_replace`: an existing
    ``dst`` is replaced as a whole, and is at every instant the complete old or new folder).

    :param src: armor-ct checkpoint folder
    :param dst: output folder
    :param dtype: weight dtype of the export (default: the checkpoint's ``dtype``)
    :return: ``dst`` as an absolute path
    :raises ARMORCheckpointError: if ``src`` is not an armor-ct checkpoint or is damaged, or if
        ``dst`` is ``src``, lies inside it or contains it
    """
    from .loader import check_not_mislabelled, register

    src, dst = Path(src).resolve(), resolve_target(dst)
    if dst == src or src in dst.parents or dst in src.parents:
        raise ARMORCheckpointError(
            f"export_dense cannot write {dst}: it is, contains or lies inside its source {src}; "
            "pick a folder outside the source"
        )
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ARMORCheckpointError(f"{src} has no config.json; pass an armor-ct checkpoint folder")
    check_not_mislabelled(src)
    config = json.loads(config_path.read_text())
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != ARMOR_CT:
        raise ARMORCheckpointError(
            f"{src} is not an armor-ct checkpoint (quantization_config.quant_method is "
            f"{method!r}); export_dense multiplies out ARMOR wrappers only"
        )
    register()
    model = _model_class(config).from_pretrained(src, dtype=dtype or "auto")
    densify_model(model, dtype)
    with staged_replace(dst) as stage:
        model.save_pretrained(stage)
        copy_extra_files(src, stage, skip=_not_exported)
    return dst
