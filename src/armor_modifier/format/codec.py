"""The armor-ct storage of a 2:4 core: kept values plus a packed bitmask (pure torch).

Glossary: ``W [m, n]`` the stored core (any dtype: fp32/bf16/fp16, or the 8-bit tensor that
compressed-tensors wrote for a quantized core), ``M [m, n]`` bool, exactly 2 ``True`` in every row's
4-column group; ``values [m, n/2]`` the entries of ``W`` under ``M`` in row-major order (ascending
column inside a group), ``bitmask [m, ceil(n/8)]`` uint8, ``M`` packed 8 columns per byte, column
``8j + i`` in bit ``i`` of byte ``j`` (``numpy.packbits(..., bitorder="little")``, the layout of
compressed-tensors' ``pack_bitmasks`` and of its legacy ``sparse-24-bitmask`` format).

A group whose core holds fewer than 2 non-zeros (an underflow to zero after quantization) still
stores 2 positions: the non-zeros first, then the lowest-index zeros. Values are moved as raw bits,
so every dtype round-trips bit-exactly (fp8 included; a ``-0.0`` that falls off the mask comes back
as ``+0.0``, numerically the same).
"""

from __future__ import annotations

import torch

from armor_modifier.core.errors import ARMORCheckpointError
from armor_modifier.core.sparsity import group_counts, pattern_supports

__all__ = [
    "ARMOR_CT",
    "BITMASK",
    "CORE_FORMAT",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
    "ARMORCheckpointError",
    "compress_core",
    "core_nbytes",
    "decompress_core",
    "pack_bitmask",
    "unpack_bitmask",
]

#: ``quantization_config.quant_method`` of an armor-ct checkpoint.
ARMOR_CT = "armor-ct"
#: ``quantization_config.armor.format_version`` written by this package.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
#: How cores are stored (``sparsity_config.format`` uses the same compressed-tensors name).
CORE_FORMAT = "sparse-24-bitmask"
#: Local name of the packed 2:4 mask next to the Linear's ``weight`` (which holds the values).
BITMASK = "weight_bitmask"

_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """Reinterpret ``t`` as same-width integers, so gather/scatter move raw bits for any dtype."""
    return t.contiguous().view(_BITS_DTYPE[t.element_size()])


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[m, n]`` mask to uint8 ``[m, ceil(n/8)]`` (bit ``i`` of byte ``j`` = column
    ``8j + i``)."""
    m, n = mask.shape
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8)).reshape(m, -1, 8)
    packed = bits[..., 0].clone()
    for i in range(1, 8):
        packed |= bits[..., i] << i
    return packed


def unpack_bitmask(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmask`: uint8 ``[m, ceil(n/8)]`` -> bool ``[m, n]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    table = (
        (torch.arange(256, device=bitmask.device).to(torch.uint8)[:, None] >> shifts) & 1
    ).bool()
    return table[bitmask.long()].reshape(bitmask.shape[0], -1)[:, :n]


def _patterns(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[m, n]`` -> uint8 ``[m, n/4]``, bit ``k`` of group ``g`` = column ``4g + k``."""
    m, n = mask.shape
    g = mask.view(torch.uint8).reshape(m, n // 4, 4)
    return g[..., 0] | (g[..., 1] << 1) | (g[..., 2] << 2) | (g[..., 3] << 3)


def compress_core(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 2:4 core into its kept values and packed mask.

    :param weight: ``[m, n]`` any dtype, ``4 | n``, at most 2 non-zeros in every 4-group
    :param name: module name, for error messages
    :return: ``values [m, n/2]`` (``weight.dtype``), ``bitmask [m, ceil(n/8)]`` uint8
    :raises ARMORCheckpointError: if ``weight`` is not 2-D, ``4 ∤ n`` or not 2:4
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        raise ARMORCheckpointError(
            f"{name}: the core must be 2-D with in_features divisible by 4, got shape "
            f"{list(weight.shape)}"
        )
    m, n = weight.shape
    fp8 = weight.is_floating_point() and weight.element_size() == 1
    nonzero = (weight.float() if fp8 else weight) != 0
    counts = group_counts(nonzero).to(torch.uint8)
    broken = int((counts > 2).sum())
    if broken:
        raise ARMORCheckpointError(
            f"{name}: the core is not 2:4 ({broken} of {m * n // 4} groups of 4 hold more than 2 "
            "non-zeros); something rewrote the weight after ARMOR (e.g. GPTQ, or an asymmetric "
            "quantization that maps zero to a non-zero code). Re-run ARMOR or use an RTN scheme."
        )
    mask = nonzero
    if bool((counts < 2).any()):
        zero = ~nonzero.reshape(m, n // 4, 4)
        missing = (2 - counts.to(torch.int8)).unsqueeze(-1)
        fill = zero & (zero.cumsum(-1, dtype=torch.int8) <= missing)
        mask = nonzero | fill.reshape(m, n)
    patterns = _patterns(mask)
    positions, _ = pattern_supports(weight.device)
    keep = positions[patterns.long()]
    values = _as_bits(weight).reshape(m, n // 4, 4).gather(-1, keep).reshape(m, n // 2)
    pairs = torch.nn.functional.pad(patterns, (0, (n // 4) % 2)).reshape(m, -1, 2)
    return values.view(weight.dtype), pairs[..., 0] | (pairs[..., 1] << 4)


def decompress_core(values: torch.Tensor, bitmask: torch.Tensor, n: int, name: str) -> torch.Tensor:
    """Rebuild the dense core from :func:`compress_core`'s output.

    Each bitmask byte holds two groups (low nibble, high nibble); a group's nibble selects its 2
    positions from a 16-entry table.

    :param values: ``[m, n/2]`` any dtype
    :param bitmask: ``[m, ceil(n/8)]`` uint8
    :param n: in_features
    :param name: module name, for error messages
    :return: ``[m, n]`` with ``values.dtype``, zeros (all bits clear) off the mask
    :raises ARMORCheckpointError: if the shapes disagree or the mask is not exactly 2 of 4
    """
    m = values.shape[0]
    if values.shape != (m, n // 2) or bitmask.shape != (m, (n + 7) // 8) or n % 4:
        raise ARMORCheckpointError(
            f"{name}: core values {list(values.shape)} and bitmask {list(bitmask.shape)} do not "
            f"describe a 2:4 [{m}, {n}] weight (expected [{m}, {n // 2}] and "
            f"[{m}, {(n + 7) // 8}])"
        )
    patterns = torch.stack((bitmask & 15, bitmask >> 4), dim=-1).reshape(m, -1)[:, : n // 4]
    positions, valid = pattern_supports(values.device)
    index = patterns.long()
    bad = int((~valid[index]).sum())
    if bad:
        raise ARMORCheckpointError(
            f"{name}: the stored bitmask is corrupt ({bad} groups of 4 do not mark exactly 2 "
            "kept entries); re-save or re-download the checkpoint"
        )
    dense = torch.zeros(
        m, n // 4, 4, dtype=_BITS_DTYPE[values.element_size()], device=values.device
    )
    dense.scatter_(-1, positions[index], _as_bits(values).reshape(m, n // 4, 2))
    return dense.reshape(m, n).view(values.dtype)


def core_nbytes(m: int, n: int, element_size: int) -> tuple[int, int]:
    """Bytes of a core stored dense and as armor-ct (values + bitmask)."""
    return m * n * element_size, m * (n // 2) * element_size + m * ((n + 7) // 8)
