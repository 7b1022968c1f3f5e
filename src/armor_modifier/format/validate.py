"""Check an armor-ct checkpoint against the model skeleton before any weight is loaded.

transformers with a quantizer attached does not compare shapes (it assigns whatever the file
holds) and fills missing tensors with fresh initialisations, so a damaged checkpoint would load as
a different model. :func:`validate_checkpoint` reads only the safetensors headers and raises
:class:`ARMORCheckpointError` naming the module, the tensor and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from armor_modifier.runtime import ARMOR_A, ARMOR_B

from .codec import BITMASK, ARMORCheckpointError
from .config import ARMORBlock
from .safetensors_io import TORCH_TO_SAFETENSORS, TensorInfo, read_header

__all__ = ["validate_checkpoint", "ARMOR_LOCAL_NAMES"]

#: What every wrapped Linear stores: core values, packed mask, output and input wrapper.
ARMOR_LOCAL_NAMES = ("weight", BITMASK, ARMOR_A, ARMOR_B)
#: How ``armor_A``/``armor_B`` may be stored (the loader casts them to the model dtype).
_WRAPPER_DTYPES = ("F32", "F16", "BF16", "F64")
_REBUILD = "re-save the model with armor_modifier.save_armor_pretrained, or re-download it"


def _module_of(key: str) -> tuple[str, str]:
    module, _, local = key.rpartition(".")
    return module, local


def _list(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validate_checkpoint(
    files: Sequence[str | os.PathLike], model: nn.Module, block: ARMORBlock
) -> None:
    """Validate the safetensors ``files`` of an armor-ct checkpoint against ``model``.

    ``model`` is the skeleton after the loader registered the armor-ct tensors (``weight``
    ``[m, n/2]``, ``weight_bitmask``, ``armor_A``, ``armor_B``) on every listed module.

    :raises ARMORCheckpointError: for a truncated or unreadable file; a listed module missing one of
        its four tensors; a tensor whose shape differs from the model's; an 8-bit core stored with
        another dtype; wrappers not stored as 16-, 32- or 64-bit floats; an integer or bool tensor
        where the model holds a floating-point one; wrapper tensors for a module the config does
        not list
    """
    headers = [read_header(f) for f in files]
    for header in headers:
        cut = header.truncated()
        if cut:
            modules = sorted({_module_of(k)[0] for k in cut})
            needed = header.data_start + max(header.tensors[k].end for k in cut)
            raise ARMORCheckpointError(
                f"{header.path} is truncated ({header.file_size} of {needed} bytes): it cuts off "
                f"{len(cut)} tensors of {_list(modules)}; {_REBUILD}"
            )
    where: dict[str, tuple[str, TensorInfo]] = {}
    for header in headers:
        for key, info in header.tensors.items():
            where[key] = (header.path.name, info)
    expected = model.state_dict()
    for name in block.modules:
        for local in ARMOR_LOCAL_NAMES:
            if f"{name}.{local}" not in where:
                raise ARMORCheckpointError(
                    f"{name}: '{local}' is missing from the checkpoint although config.json lists "
                    f"{name} as ARMOR-wrapped; the checkpoint is incomplete ({_REBUILD})"
                )
    listed = set(block.modules)
    for key, (file_name, info) in where.items():
        module, local = _module_of(key)
        if module in listed and key not in expected:
            raise ARMORCheckpointError(
                f"{module}: the checkpoint holds '{local}' ({file_name}), which an armor-ct Linear "
                f"does not store; the file was not written by armor-modifier ({_REBUILD})"
            )
        if local in (ARMOR_A, ARMOR_B, BITMASK) and module not in listed:
            raise ARMORCheckpointError(
                f"{module}: the checkpoint holds '{local}' ({file_name}) but config.json's "
                "armor.modules does not list the module; config.json and the weights do not match "
                f"({_REBUILD})"
            )
        if key not in expected:
            continue
        want = expected[key]
        if tuple(want.shape) != info.shape:
            raise ARMORCheckpointError(
                f"{module}: tensor '{local}' has shape {list(info.shape)} in {file_name}, expected "
                f"{list(want.shape)}{_hint(module, local, want, block)}; the checkpoint does not "
                f"match its config.json ({_REBUILD})"
            )
        if module in listed and local in ("weight", BITMASK):
            _check_dtype(module, local, want.dtype, info.dtype, file_name)
        elif local in (ARMOR_A, ARMOR_B) and info.dtype not in _WRAPPER_DTYPES:
            raise ARMORCheckpointError(
                f"{module}: tensor '{local}' is stored as {info.dtype} in {file_name}, but ARMOR "
                f"wrappers must be floating point ({', '.join(_WRAPPER_DTYPES)}; this model holds "
                f"them as {_st_name(want.dtype)}); the file was altered or not written by "
                f"armor-modifier ({_REBUILD})"
            )
        elif want.dtype.is_floating_point and not _is_float(info.dtype):
            raise ARMORCheckpointError(
                f"{module}: tensor '{local}' is stored as {info.dtype} in {file_name}, but the "
                f"model holds it as {_st_name(want.dtype)}; loading would cast integers or bools "
                f"into it silently. The file was altered or not written by armor-modifier "
                f"({_REBUILD})"
            )


def _is_float(safetensors_dtype: str) -> bool:
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"


def _st_name(dtype: torch.dtype) -> str:
    return TORCH_TO_SAFETENSORS.get(dtype, str(dtype))


def _hint(module: str, local: str, want: torch.Tensor, block: ARMORBlock) -> str:
    if module not in block.modules:
        return ""
    b_a, b_b = block.modules[module]
    if local == ARMOR_A:
        return f" ([out_features / {b_a}, {b_a}, {b_a}])"
    if local == ARMOR_B:
        return f" ([in_features / {b_b}, {b_b}, {b_b}])"
    if local == "weight":
        return " (the 2:4 core's kept values, [out_features, in_features / 2])"
    return ""


def _check_dtype(module: str, local: str, want: torch.dtype, got: str, file_name: str) -> None:
    if local == BITMASK:
        ok = got == "U8"
    elif want.is_floating_point and want.itemsize > 1:
        ok = got in ("F32", "F16", "BF16", "F64")
    else:
        ok = got == TORCH_TO_SAFETENSORS.get(want)
    if not ok:
        raise ARMORCheckpointError(
            f"{module}: tensor '{local}' is stored as {got} in {file_name}, but the config's "
            f"quantization expects {TORCH_TO_SAFETENSORS.get(want, want)}; the checkpoint does not "
            f"match its config.json ({_REBUILD})"
        )
