"""An exact, device-side digest of calibration inputs, for progress files (:mod:`.progress`).

A resumed run checks that a decoder layer it loads would have seen the same inputs as the run
that solved it. Hashing every input's bytes on the CPU would move the whole calibration stream
off the accelerator, so each batch is first reduced on its own device to two integers:

    c_k = sum_i (bits_i * w_k(i)) mod P        (k = 1, 2; P = 2^31 - 1)

where ``bits_i`` is element ``i``'s bit pattern read as a signed integer and ``w_k(i)`` a fixed
position weight in ``[1, P - 1]``. Integer arithmetic makes the pair the same on every device and
under any thread count. A change of one element changes both (``w_k(i)`` is invertible mod
``P``) unless the two bit patterns are congruent mod ``P``: never for 16-bit floats; for 32-bit
floats a positive value's pattern and the negative value whose magnitude pattern is one above
it (``1.0`` and ``-1.0000001``); for 64-bit floats patterns a multiple of ``P`` apart. A random
change of several leaves both unchanged with a chance of about ``P^-2``. This guards against
accidents (other data, another torch build), not adversaries. The pairs, with each batch's dtype
and shape, feed one SHA-256 in sorted order: the digest is that of the batches as a collection,
whatever order they came in (the calibration statistics do not depend on it either, and
llm-compressor shuffles the calibration batches by default).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

__all__ = ["InputDigest", "batch_checksum", "position_weights", "tensors_sha256"]

_P = 2**31 - 1
#: multipliers and offsets of the two position weights w_k(i) = (a_k * i + c_k) mod (P - 1) + 1
_WEIGHTS = ((48271, 12345), (69621, 54321))
_INTEGER_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def position_weights(numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[2, numel]`` int64: ``w_k(i)`` for ``i < numel``, on ``device``."""
    position = torch.arange(numel, device=device, dtype=torch.int64).remainder(_P)
    return torch.stack(
        [(position * multiplier + offset).remainder(_P - 1) + 1 for multiplier, offset in _WEIGHTS]
    )


def batch_checksum(x: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[int, int]:
    """The two checksums ``(c_1, c_2)`` of ``x`` (any shape, any dtype of 1, 2, 4 or 8 bytes),
    computed on ``x``'s device; each lies in ``[0, P)``.

    :param weights: :func:`position_weights` of ``x.numel()`` on ``x``'s device, when the caller
        keeps them for batches of one size (formed here otherwise)
    """
    flat = x.detach().contiguous().reshape(-1)
    if weights is None:
        weights = position_weights(flat.numel(), flat.device)
    bits = flat.view(_INTEGER_VIEW[flat.element_size()]).to(torch.int64)
    if flat.element_size() == 8:
        bits = bits.remainder(_P)  # 64-bit patterns: reduce first, so products fit int64
    # |bits| <= 2^31 and weights < 2^31: each product fits int64, and remainder() is never
    # negative, so (bits * w) mod P is (bits mod P) * w mod P; each remainder is < 2^31, so the
    # sum of fewer than 2^32 of them fits int64
    sums = (bits * weights).remainder(_P).sum(-1)
    first, second = sums.remainder(_P).tolist()
    return int(first), int(second)


def tensors_sha256(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of each tensor's dtype, shape and bytes in turn (read on the CPU), for files and
    fingerprints that must match exactly (:mod:`.progress`, :mod:`.fast_forward`)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


class InputDigest:
    """A SHA-256 over a collection of batches: dtype, shape and :func:`batch_checksum` of each,
    in sorted order (the batches' order does not count)."""

    def __init__(self) -> None:
        self._records: list[str] = []
        #: the position weights of the last batch's size (calibration batches repeat one size)
        self._weights: torch.Tensor | None = None

    @property
    def batches(self) -> int:
        return len(self._records)

    def add(self, x: torch.Tensor) -> None:
        kept = self._weights
        if kept is None or kept.shape[1] != x.numel() or kept.device != x.device:
            kept = self._weights = position_weights(x.numel(), x.device)
        first, second = batch_checksum(x, kept)
        self._records.append(f"{x.dtype}{tuple(x.shape)}:{first}:{second};")

    def hexdigest(self) -> str:
        return hashlib.sha256("".join(sorted(self._records)).encode()).hexdigest()
