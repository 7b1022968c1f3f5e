"""The precision of the output objective's ``n x n`` products with ``H`` (``matmul_precision``)
and of the reconstruction's fit steps (``reconstruction_precision``).

``"auto"`` takes bfloat16 inputs where the hardware multiplies bfloat16 natively
and float32 elsewhere: on a CUDA device that supports bfloat16 without emulation, and on a CPU
with AVX-512 BF16 or AMX instructions. Without them a bfloat16 product is emulated and slower
than float32's. Either way the loss and the line searches sum in float32 and the returned loss
is rechecked in float32 (:class:`~armor_modifier.core.output.OutputObjective`); what each
precision costs and gives: docs/results.md, layer scaling and the Qwen side by side.
"""

from __future__ import annotations

import torch

__all__ = ["MATMUL_PRECISIONS", "native_bfloat16", "resolve_matmul_precision"]

#: ``matmul_precision`` values: ``"auto"`` resolves to one of the other two per device.
MATMUL_PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (CUDA without emulation; a
    CPU with AVX-512 BF16 or AMX tiles, as torch detects them)."""
    if device.type == "cuda":
        with torch.cuda.device(device):  # that device's capability, not the current one's
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, check, lambda: False)()) for check in checks)
    return False


def resolve_matmul_precision(setting: str, device: torch.device) -> str:
    """``"float32"`` or ``"bfloat16"``: ``setting`` itself, or for ``"auto"`` bfloat16 where
    :func:`native_bfloat16` holds on ``device``."""
    if setting != "auto":
        return setting
    return "bfloat16" if native_bfloat16(device) else "float32"
