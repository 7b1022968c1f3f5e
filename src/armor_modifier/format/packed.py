"""Cores that compressed-tensors stores bit-packed (``pack-quantized``, e.g. W4A16).

compressed-tensors keeps such a core as ``weight_packed`` (int32 ``[m, ceil(n·bits/32)]``, codes
offset to unsigned, so a zero weight is not a zero bit pattern) plus ``weight_shape``. armor-ct
unpacks the signed codes, keeps the 2:4 entries (:func:`.codec.compress_core`) and packs
the kept codes the same way: int32 ``[m, ceil((n/2)·bits/32)]``, stored under the Linear's
``weight`` key like every other armor-ct core (so a loader without this package fails on the
shape). The loader reverses it into compressed-tensors' ``weight_packed``.
"""

from __future__ import annotations

import math

import torch

from .codec import compress_core, decompress_core

__all__ = ["PACKED", "packed_columns", "compress_packed_core", "decompress_packed_core"]

#: compressed-tensors' name of a bit-packed weight.
PACKED = "weight_packed"


def packed_columns(columns: int, bits: int) -> int:
    """int32 words per row for ``columns`` codes of ``bits`` bits."""
    return math.ceil(columns * bits / 32)


def compress_packed_core(
    packed: torch.Tensor, shape: tuple[int, int], bits: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' ``weight_packed`` -> armor-ct ``(weight, weight_bitmask)``.

    :param packed: int32 ``[m, ceil(n·bits/32)]``
    :param shape: ``(m, n)`` of the dense core
    :return: int32 ``[m, ceil((n/2)·bits/32)]`` kept codes, uint8 ``[m, ceil(n/8)]`` mask
    """
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    codes = unpack_from_int32(packed, bits, torch.Size(shape))
    values, bitmask = compress_core(codes, name)
    return pack_to_int32(values, bits), bitmask


def decompress_packed_core(
    values: torch.Tensor, bitmask: torch.Tensor, shape: tuple[int, int], bits: int, name: str
) -> torch.Tensor:
    """Inverse of :func:`compress_packed_core`: compressed-tensors' ``weight_packed``."""
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    m, n = shape
    kept = unpack_from_int32(values, bits, torch.Size((m, n // 2)))
    return pack_to_int32(decompress_core(kept, bitmask, n, name), bits)
